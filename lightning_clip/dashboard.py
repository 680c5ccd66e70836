"""A W&B workspace laid out for reviewing clipping, as code (needs ``pip install wandb-workspaces``).

    from lightning_clip.dashboard import clipping_workspace
    clipping_workspace("my-team", "my-project").save()   # needs a W&B account and network

Sections, top to bottom: the global norm before and after clipping with the threshold; how often clipping fired
and the non-finite count; per-layer gradient norms, ratios and maxima (one line per layer, by regex, so it fits any
model); the heatmap image and histograms.
"""

from __future__ import annotations

from typing import Any

STEP = "trainer/global_step"


def clipping_workspace(entity: str, project: str, name: str = "lightning_clip: gradient clipping") -> Any:
    """The workspace (a ``wandb_workspaces.workspaces.Workspace``); call ``.save()`` on it to create it online."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    def lines(title: str, keys: list[str], log_y: bool = False) -> Any:
        return wr.LinePlot(title=title, x=STEP, y=keys, log_y=log_y)

    def per_layer(title: str, regex: str) -> Any:
        return wr.LinePlot(title=title, x=STEP, metric_regex=regex, log_y=True)

    sections = [
        ws.Section(
            name="Global gradient norm",
            is_open=True,
            panels=[
                lines("norm before / after clipping", ["grad/norm", "grad/norm_clipped"], log_y=True),
                lines("largest norm since the previous record (no spike unseen)", ["grad/norm_max"], log_y=True),
                lines("threshold in force", ["clip/threshold"]),
            ],
        ),
        ws.Section(
            name="Clipping activity",
            is_open=True,
            panels=[
                lines("fraction of steps clipped", ["clip/rate"]),
                lines("clip coefficient (1 = untouched)", ["clip/coef"]),
                lines(
                    "non-finite / skipped steps",
                    ["clip/nonfinite_steps", "clip/skipped_steps", "clip/spike_skipped_steps"],
                ),
            ],
        ),
        ws.Section(
            name="Per layer",
            is_open=True,
            panels=[
                per_layer("gradient norm per layer", "grad_norm/.*"),
                per_layer("largest gradient norm per layer since the previous record", "grad_norm_max/.*"),
                per_layer("gradient / parameter norm per layer", "grad_ratio/.*"),
                per_layer("largest |gradient| per layer", "grad_max/.*"),
                per_layer("non-finite gradients per layer", "grad_nonfinite/.*"),
            ],
        ),
        ws.Section(
            name="Updates (log_updates=True)",
            is_open=True,
            panels=[
                lines("update / parameter norm, whole model", ["update/ratio"], log_y=True),
                per_layer("update / parameter norm per layer", "update_ratio/.*"),
                per_layer("update norm per layer", "update_norm/.*"),
            ],
        ),
        ws.Section(
            name="Heatmap and histograms",
            panels=[wr.MediaBrowser(title="gradient norm heatmap (layers x steps)", media_keys=["grad_norm_heatmap"])],
        ),
    ]
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections)
