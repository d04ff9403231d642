"""Dictionary learning with persistent (warm-started) LCA states per training crop.
usage: python dictlearn2.py lam steps lca_iters pool batch lr out"""
import sys, time, torch
from common import *
lam, steps, iters, pool, batch, lr, out = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]), sys.argv[7]
d = load_data()
x_all = d["train"][:pool]
D = ConvDictionary(64, 3, 9, 2, seed=0)
opt = torch.optim.Adam(D.parameters(), lr=lr)
U = torch.zeros(pool, 64, 16, 16)
g = torch.Generator().manual_seed(0)
t0 = time.time(); c0 = time.process_time()
for step in range(steps):
    idx = torch.randperm(pool, generator=g)[:batch]
    x = x_all[idx]
    lca = LCA(D, lam=lam, tau="auto")
    r = lca(x, iters=iters, u0=U[idx])
    U[idx] = r.u
    a = r.a
    loss = 0.5 * (x - D.decode(a)).pow(2).flatten(1).sum(1).mean()
    opt.zero_grad(); loss.backward(); opt.step(); D.normalize_()
    if step % 25 == 0 or step == steps - 1:
        l0 = (a != 0).float().flatten(1).sum(1).mean()
        print(f"step {step} loss {loss.item():.2f} l0 {l0:.1f} E {loss.item()+0.5*lam*lam*l0:.2f} L {D.operator_norm(32,32):.1f} t {time.time()-t0:.0f}s cpu {time.process_time()-c0:.0f}s", flush=True)
print("dict wall", time.time() - t0, "cpu", time.process_time() - c0)
D.save(out)
lca = LCA(D, lam=lam, tau="auto")
x = d["test"][:128]
r = lca(x, iters=300, trace=True)
E = r.trace["energy"].mean(1); L0 = r.trace["l0"].mean(1)
for k in (10, 30, 100, 300):
    print(k, f"E {E[k]:.2f} l0 {L0[k]:.1f}")
print("L", D.operator_norm(32, 32), "|x|^2/2", 0.5 * x.pow(2).flatten(1).sum(1).mean().item())
