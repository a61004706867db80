"""DMD against co-training on a Stage-2 student: the norms of their parameter gradients and their cosine.

    python tools/dmd_balance.py RUN_DIR STAGE2_DIR [CONFIG]

RUN_DIR holds the teacher, Stage 1 and data of the run (its ``run.output_dir``); STAGE2_DIR a Stage-2 output
with a ``checkpoints/step-*/training_state`` (the student and critic of its latest step are loaded). Prints
each of 6 fresh batches (a backward-simulation draw + DMD, a co-training batch) and the means
(docs/experiments.md, "Why DMD at weight 1 bends the many-step map"). CPU, about a minute on the tiny model.
"""
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # learners/ lives beside anyflow_ray/
from anyflow_ray.run.config import load_config
from anyflow_ray.data.shards import read_shards
from anyflow_ray.models.loading import load_transformer
from anyflow_ray.training.objectives import PretrainObjective, TrainData
from anyflow_ray.sampling.rollouts import prefix, finish, draw_budget
from anyflow_ray.training.losses import dmd_loss
from anyflow_ray.models.loading import load_text_encoder, text_max_length
from anyflow_ray.models.text import encode_prompts
torch.set_num_threads(1)
base, run = sys.argv[1], sys.argv[2]
config = sys.argv[3] if len(sys.argv) > 3 else "configs/tiny.yaml"
cfg = load_config(config, [f"run.output_dir={base}"])
co_cfg = load_config(config, [f"run.output_dir={base}", f"pretrain.global_batch={cfg.distill.real_batch}"])
ck = Path(run) / "checkpoints" / (Path(run) / "checkpoints" / "latest").read_text().strip() / "training_state"
student = load_transformer(cfg.pretrain.output, flow_map=True, gate=cfg.model.gate)
student.load_state_dict(torch.load(ck / "student/mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")["module"])
teacher = load_transformer(cfg.teacher.output, flow_map=False).eval().requires_grad_(False)
critic = copy.deepcopy(teacher)
critic.load_state_dict(torch.load(ck / "critic/mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")["module"])
clips = read_shards(Path(cfg.data.root) / "train")
tok, enc = load_text_encoder(cfg.model.base)
uncond = encode_prompts(tok, enc, [cfg.model.negative_prompt], text_max_length(cfg.model.base))
data = TrainData(clips=clips, uncond=uncond)
obj = PretrainObjective(data, co_cfg, teacher=teacher, bidirectional_aux=0.0)
params = [p for p in student.parameters() if p.requires_grad]
def flat(loss):
    g = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(g, params)])
gen = torch.Generator().manual_seed(0)
dn, rn, cos = [], [], []
for step in range(6):
    idx = torch.randint(len(clips.prompts), (8,), generator=gen)
    ctx = clips.embeddings[idx].float()
    noise = torch.randn((8, *clips.videos.shape[1:]), generator=gen)
    n, k = draw_budget(gen, list(cfg.distill.budgets))
    with torch.no_grad():
        st = prefix(student, noise, ctx, n, k, cfg.schedule.shift)
    x_hat = finish(student, st, ctx)[1]
    d, _ = dmd_loss(x_hat, critic, teacher, ctx, uncond, gen, cfg.schedule.shift, cfg.distill.dmd_guidance)
    r, _ = obj.loss(student, 1000 + step)
    gd, gr = flat(d), flat(r)
    dn.append(float(gd.norm())); rn.append(float(gr.norm())); cos.append(float(torch.nn.functional.cosine_similarity(gd, gr, dim=0)))
    print(f"N={n:2d} k={k:2d}  |grad DMD| {dn[-1]:.4f}  |grad co-training| {rn[-1]:.4f}  cos {cos[-1]:+.3f}", flush=True)
print(f"{run}: mean |grad DMD| / |grad co-training| = {sum(dn)/len(dn) / (sum(rn)/len(rn)):.2f}, mean cos {sum(cos)/len(cos):+.3f}")
