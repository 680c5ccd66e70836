"""The packaged ``clipping`` config group. Hydra imports this package when an app's search path names
``pkg://lightning_clip.conf``; importing it registers the group's typed schemas (``lightning_clip.configs``)."""

from lightning_clip.configs import register_configs

register_configs()
