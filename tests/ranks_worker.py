"""The K-FAC fit, the GLM and the sampled predictive of one tiny model, run as one process or under
``torchrun`` (each rank its share): ``python ranks_worker.py TINY_LLAMA OUT.safetensors``.
Rank 0 writes every result; ``tests/test_distributed.py`` compares the two."""

import os
import sys
from pathlib import Path

import pyro
import torch
from safetensors.torch import save_file
from torch import distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from linear_models import laplace_model_of  # noqa: E402

from pyro_llm import ranks  # noqa: E402
from pyro_llm.curvature import KFACConfig, fit_kfac  # noqa: E402
from pyro_llm.evaluation import predict_proba  # noqa: E402
from pyro_llm.evaluation.glm import glm_logit_moments  # noqa: E402
from pyro_llm.infer.laplace import blocks_from_factors  # noqa: E402
from pyro_llm.guides import LaplaceGuide  # noqa: E402


def main(tiny: str, out: str) -> None:
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model, data = laplace_model_of(tiny)  # 12 examples: 3 batches of 4, unevenly shared by 2 ranks
    results: dict[str, torch.Tensor] = {}
    for tag, cfg in (("dense", KFACConfig(n_kfac=3)), ("streamed", KFACConfig(n_kfac=16, dense_threshold=0))):
        fit = fit_kfac(model, data, cfg, progress=False, generator=torch.Generator().manual_seed(1))
        results[f"{tag}/loglik"] = torch.tensor(fit.log_likelihood, dtype=torch.float64)
        for name, (S, A) in fit.factors.items():
            results[f"{tag}/{name}/S"] = S.to_matrix()
            results[f"{tag}/{name}/A"] = A.to_matrix()
    guide = LaplaceGuide(model, blocks_from_factors(model, fit), 2.0)
    mean, cov = glm_logit_moments(guide, data, torch.tensor([1.0, 10.0]), batch_size=4, progress=False)
    results.update({"glm/mean": mean, "glm/cov": cov})
    pyro.set_rng_seed(2)
    results["nn/probs"] = predict_proba(model, guide, data, num_samples=3, batch_size=4, progress=False)
    results["batches/local"] = torch.tensor(len(ranks.shard(data.by_length(4))))
    if ranks.world()[0] == 0:
        save_file({k: v.contiguous() for k, v in results.items()}, out)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
