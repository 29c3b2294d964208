"""Time one training step (forward + backward through `Trainer.loss`) of the lm and quiet tasks at given windows, in
float32 and in bf16 autocast on the CPU (docs/training.md, "bf16 autocast on the CPU").

    SHAREDCTX_DATA=../shared/data python recipes/results/reading/time_autocast.py fp32,bf16 512,2048
"""

import sys, time, torch, numpy as np
from sharedctx.training.trainer import Trainer, load_recipe
from sharedctx.training.objectives import quiet_example
from sharedctx.training.data import lm_example
torch.set_num_threads(1)
cfg = load_recipe("recipes/results/reading/long_window_quiet.toml", out_dir="runs/time-autocast")
t0=time.time(); tr = Trainer(cfg); print("setup", round(time.time()-t0,1), flush=True)
rng = np.random.default_rng(1)
modes = sys.argv[1].split(",")
for w in [int(x) for x in sys.argv[2].split(",")]:
    for task in ("lm","quiet"):
        k=3
        if task=="lm":
            ex = lm_example(tr.shards.sample(k*1024+w, rng), context_tokens=k*1024)
        else:
            win, doc = tr.shards.draw(w, rng); ex = quiet_example(win, tr.shards.draw(k*1024, rng, exclude=doc)[0])
        for mode in modes:
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode=="bf16" else torch.autocast("cpu", enabled=False)
            tr.llm.train()
            t=time.perf_counter()
            tr._autocast = lambda ctx=ctx: ctx
            loss,_ = tr.loss([ex]); loss.backward(); tr.opt.zero_grad(set_to_none=True)
            print(task, w, mode, "loss", round(float(loss),4), "s", round(time.perf_counter()-t,1), flush=True)
