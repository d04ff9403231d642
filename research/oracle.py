"""Oracle warm starts: states from a target solver run on the *test* crops themselves (a perfect predictor),
then k more plain LCA steps. Tells which target solver could let a warm start beat cold LCA."""
import sys, time, torch
from common import *
dpath = sys.argv[1]; lam = float(sys.argv[2]); n = int(sys.argv[3])
d = load_data(); D = ConvDictionary.load(dpath)
x = d["test"][:n]
lca = LCA(D, lam=lam, tau="auto")
print("L", D.operator_norm(32, 32), flush=True)
def report(name, u, t):
    r = lca(x, iters=10, u0=u, trace=True)
    E = r.trace["energy"].mean(1); L0 = r.trace["l0"].mean(1)
    print(f"{name}: k=0 E {E[0]:.2f} l0 {L0[0]:.1f} | k=1 {E[1]:.2f} | k=10 E {E[10]:.2f} l0 {L0[10]:.1f}   cpu {t:.0f}s", flush=True)
for spec in sys.argv[4:]:
    kind, it, lam0 = spec.split(":"); it = int(it); lam0 = float(lam0)
    c = time.process_time()
    if kind == "cold":
        u = cold_states(D, x, lam, it)
    else:
        u = continuation_states(D, x, lam, it, lam0)
    report(spec, u, time.process_time() - c)
    torch.save(u, f"/tmp/wl/oracle_{spec.replace(':','_')}.pt")
