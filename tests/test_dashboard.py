from lightning_clip.dashboard import clipping_workspace


def test_workspace_panels_use_the_recorded_keys():
    workspace = clipping_workspace("team", "project")
    assert workspace.entity == "team" and workspace.project == "project"
    panels = [panel for section in workspace.sections for panel in section.panels]
    plotted = {key for panel in panels for key in (getattr(panel, "y", None) or [])}
    assert {"grad/norm", "grad/norm_clipped", "grad/norm_max", "clip/threshold", "clip/rate", "clip/coef"} <= plotted
    assert {"update/ratio", "clip/spike_skipped_steps"} <= plotted
    regexes = {getattr(panel, "metric_regex", None) for panel in panels}
    assert {"grad_norm/.*", "grad_ratio/.*", "grad_max/.*", "grad_nonfinite/.*", "grad_norm_max/.*"} <= regexes
    assert {"update_ratio/.*", "update_norm/.*"} <= regexes
    assert all(getattr(panel, "x", "trainer/global_step") == "trainer/global_step" for panel in panels)
