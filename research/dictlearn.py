import sys, time, torch
from common import *
lam = float(sys.argv[1]); steps = int(sys.argv[2]); iters = int(sys.argv[3])
d = load_data()
t = time.time()
D = learn_dictionary(d["train"], lam=lam, steps=steps, lca_iters=iters, batch=48, lr=4e-3, log_every=20)
print("dict time", time.time() - t)
D.save(f"/tmp/wl/dict_l{lam}_s{steps}_i{iters}.pt")
# quick check on test: cold energy after 100/1000
lca = LCA(D, lam=lam, tau="auto")
x = d["test"][:128]
r = lca(x, iters=300, trace=True)  # 128 imgs
E = r.trace["energy"].mean(1); L0 = r.trace["l0"].mean(1)
for k in (10, 30, 100, 300):
    print(k, f"E {E[k]:.2f} l0 {L0[k]:.1f}")
print("L", D.operator_norm(32, 32), "|x|^2/2", 0.5 * x.pow(2).flatten(1).sum(1).mean().item())
