"""One warm-start experiment: targets (cached) -> WARP-CNN -> eval vs cold LCA on test crops.
usage: python exp.py key=value ...   (see defaults)"""
import sys, time, json, hashlib, os
import torch
from common import *

cfg = dict(dict="/tmp/wl/dict.pt", lam=0.5, target="cold", titers=300, lam0=4.0, frac=0.7, n_train=1024,
           epochs=30, batch=64, lr=2e-3, width=64, depth=3, loss="laplacian", gamma=3.0, drive=0,
           n_eval=128, eval_iters=1000, scales="1.0", tag="", wd=0.0)
for a in sys.argv[1:]:
    k, v = a.split("=", 1)
    cfg[k] = type(cfg[k])(v) if not isinstance(cfg[k], int) or k in () else int(float(v))
print(cfg, flush=True)
d = load_data()
D = ConvDictionary.load(cfg["dict"])
lam = cfg["lam"]
lca = LCA(D, lam=lam, tau="auto")
xtr = d["train"][:cfg["n_train"]]
xte = d["test"][:cfg["n_eval"]]
dkey = hashlib.md5(open(cfg["dict"], "rb").read()).hexdigest()[:6]
times = {}

# ---- targets (cached) ----
def targets(kind, n, titers):
    f = f"/tmp/wl/tg_{dkey}_{lam}_{kind}_{titers}_{cfg['lam0']}_{cfg['frac']}_{n}.pt"
    if os.path.exists(f):
        return torch.load(f)
    # reuse a larger cache if present
    t = time.process_time()
    if kind == "cold":
        u = cold_states(D, xtr[:n], lam, titers)
    elif kind == "cont":
        u = continuation_states(D, xtr[:n], lam, titers, cfg["lam0"], frac=cfg["frac"])
    elif kind == "best":
        uc = targets("cold", n, titers); uk = targets("cont", n, titers)
        ec = lca.energy(xtr[:n], lca.threshold(uc)); ek = lca.energy(xtr[:n], lca.threshold(uk))
        u = torch.where((ek < ec).view(-1, 1, 1, 1), uk, uc)
        print(f"best: cont wins on {(ek<ec).float().mean():.2f}")
    times["targets_cpu"] = time.process_time() - t
    torch.save(u, f)
    return u

utr = targets(cfg["target"], cfg["n_train"], cfg["titers"])
etr = lca.energy(xtr, lca.threshold(utr)).mean().item()
l0tr = (lca.threshold(utr) != 0).flatten(1).sum(1).float().mean().item()
print(f"target train energy {etr:.2f} l0 {l0tr:.1f}  ({times})", flush=True)

# ---- cold eval (cached) ----
fc = f"/tmp/wl/cold_{dkey}_{lam}_{cfg['n_eval']}_{cfg['eval_iters']}.pt"
if os.path.exists(fc):
    cold = torch.load(fc)
else:
    r = lca(xte, iters=cfg["eval_iters"], trace=True)
    cold = {k: v.mean(1) for k, v in r.trace.items()}
    cold["psnr"] = (-10 * torch.log10(r.trace["mse"])).mean(1)
    torch.save(cold, fc)

# ---- predictor ----
t = time.process_time()
net, wall = train_predictor(xtr, utr, lam, cfg["width"], cfg["depth"], cfg["loss"], cfg["gamma"], cfg["epochs"],
                            cfg["batch"], cfg["lr"], bool(cfg["drive"]), D, wd=cfg["wd"])
times["train_cpu"] = time.process_time() - t; times["train_wall"] = wall
u0 = predict(net, xte)
# prediction quality vs cold states on test at titers? report active fraction
print(f"pred: active {(u0.abs()>lam).float().mean()*100:.2f}%  |u0| mean {u0.abs().mean():.3f}", flush=True)

KS = [0, 1, 2, 5, 10, 20, 50, 100, 300, 1000]
def row(tr):
    return {k: (round(tr["energy"][k].item(), 2), round(tr["l0"][k].item(), 1), round(tr["psnr"][k].item(), 2)) for k in KS if k < len(tr["energy"])}
res = {"cfg": cfg, "cold": row(cold), "times": times, "target_E": etr, "target_l0": l0tr}
Ec = cold["energy"][-1].item()
for s in [float(v) for v in cfg["scales"].split(",")]:
    r = lca(xte, iters=cfg["eval_iters"], u0=u0 * s, trace=True)
    w = {k: v.mean(1) for k, v in r.trace.items()}
    w["psnr"] = (-10 * torch.log10(r.trace["mse"])).mean(1)
    m = iters_to_match(w["energy"], Ec)
    res[f"warm_s{s}"] = row(w); res[f"match_s{s}"] = m
    print(f"scale {s}: iters-to-match cold@{cfg['eval_iters']} ({Ec:.2f}): {m}", flush=True)
print("k: cold (E,l0,psnr) | warm")
for k in KS:
    if k < len(cold["energy"]):
        print(k, res["cold"][k], *[res[f"warm_s{s}"][k] for s in cfg["scales"].split(",")])
os.makedirs("/tmp/wl/res", exist_ok=True)
name = cfg["tag"] or hashlib.md5(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]
json.dump(res, open(f"/tmp/wl/res/{name}.json", "w"), indent=1)
torch.save(net.state_dict(), f"/tmp/wl/res/{name}_net.pt")
print("times", times)
