"""Which clipping works, measured: tasks x clipping configurations x seeds, one Hydra multirun job per cell.

    python scripts/study.py --quick      # 4 tasks x 4 configurations x 1 seed, 150 steps: about a minute on 2 cores
    python scripts/study.py -m task=adding,multiplication,digits,textlm 'cell=range(0,14)' seed=0,1,2  # full grid
    python scripts/study.py --merge OUT SWEEP [SWEEP ...]  # sweeps together; runs of cells no longer in the grid out

Each job writes result.json; the sweep ends with results.md / results.csv / results.png in studies/<time>/.
Every configuration runs with nonfinite="ignore", so only the clipping differs: a run that explodes is recorded as
diverged (and stopped early), not skipped.
"""

import math
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lightning_clip.study import run_cell

QUICK = ["-m", "task=adding,multiplication,digits,textlm", "grid=quick", "cell=0,1,2,3", "seed=0", "task.steps=150"]


@hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parents[1] / "conf"), config_name="study")
def main(cfg: DictConfig) -> float:
    torch.set_num_threads(cfg.threads)
    result = run_cell(cfg, Path(HydraConfig.get().runtime.output_dir))
    return result.get("final_loss", math.nan)


if __name__ == "__main__":
    if "--merge" in sys.argv:  # python scripts/study.py --merge OUT SWEEP [SWEEP ...]
        from omegaconf import OmegaConf

        from lightning_clip.study import main_tables

        out, *sweeps = sys.argv[sys.argv.index("--merge") + 1 :]
        grid = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/grid/full.yaml"))
        print("\n".join(map(str, main_tables([Path(s) for s in sweeps], Path(out), grid["cells"]))))
        sys.exit(0)
    if "--quick" in sys.argv:
        sys.argv = [sys.argv[0], *QUICK, *(a for a in sys.argv[1:] if a != "--quick")]
    main()
