"""Post-hoc on a trained WARP-CNN: (a) state-scale calibration, (b) fine-tuning on the LCA energy of the
prediction itself (straight-through hard threshold: hard mask forward, sigmoid((|u|-λ)/T) gradient backward),
mixed with the imitation loss. Evaluates k = 0,1,10 (cheap) on the test crops.
usage: python finetune.py dict net_tag lam n_train titers epochs alpha T [width depth]"""
import sys, time, torch
from common import *
dpath, tag, lam, n, titers, epochs, alpha, T = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7]), float(sys.argv[8])
width, depth = (int(sys.argv[9]), int(sys.argv[10])) if len(sys.argv) > 10 else (48, 3)
d = load_data(); D = ConvDictionary.load(dpath); D.requires_grad_(False)
lca = LCA(D, lam=lam, tau="auto")
xtr = d["train"][:n]; xte = d["test"][:128]
import glob
utr = torch.load(glob.glob(f"/tmp/wl/tg_*_{lam}_cont_{titers}_4.0_0.7_{n}.pt")[0])
net = WarpCNN(64, width, depth); net.load_state_dict({k: v for k, v in torch.load(f"/tmp/wl/res/{tag}_net.pt").items() if not k.startswith("D.")}); net.eval()
def ev(name, u0):
    r = lca(xte, iters=10, u0=u0, trace=True)
    E = r.trace["energy"].mean(1); L0 = r.trace["l0"].mean(1)
    ps = (-10 * torch.log10(r.trace["mse"])).mean(1)
    print(f"{name}: E k0 {E[0]:.2f} k1 {E[1]:.2f} k10 {E[10]:.2f} | l0 k0 {L0[0]:.1f} k10 {L0[10]:.1f} | psnr k10 {ps[10]:.2f}", flush=True)
    return E
u0 = predict(net, xte)
for s in (0.9, 1.0, 1.1, 1.25):
    ev(f"scale {s}", u0 * s)
class STEHard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u):
        ctx.save_for_backward(u); return (u.abs() > lam).to(u.dtype)
    @staticmethod
    def backward(ctx, g):
        (u,) = ctx.saved_tensors; s = torch.sigmoid((u.abs() - lam) / (T * lam))
        return g * s * (1 - s) / (T * lam) * u.sign()
opt = torch.optim.Adam(net.parameters(), lr=3e-4)
net.train(); t0 = time.process_time()
for ep in range(epochs):
    perm = torch.randperm(n); tot = 0
    for s in range(0, n, 64):
        idx = perm[s:s + 64]; xb, ub = xtr[idx], utr[idx]
        u = net(xb); m = STEHard.apply(u); a = u * m
        E = (0.5 * (xb - D.decode(a)).pow(2).flatten(1).sum(1) + 0.5 * lam * lam * m.flatten(1).sum(1)).mean()
        l = E + alpha * loss_fn(u, ub, "laplacian", lam)
        opt.zero_grad(); l.backward(); opt.step(); tot += E.item() * len(idx)
    print(f" ft ep {ep} train E(T(u_hat)) {tot/n:.2f} cpu {time.process_time()-t0:.0f}s", flush=True)
net.eval(); u0 = predict(net, xte)
for s in (1.0, 1.1):
    ev(f"finetuned scale {s}", u0 * s)
import os
if os.environ.get("FULL"):
    cold = torch.load(glob.glob(f"/tmp/wl/cold_*_{lam}_128_1000.pt")[0])
    r = lca(xte, iters=1000, u0=u0, trace=True)
    E = r.trace["energy"].mean(1); L0 = r.trace["l0"].mean(1); ps = (-10 * torch.log10(r.trace["mse"])).mean(1)
    print("match", iters_to_match(E, cold["energy"][-1].item()))
    for k in (0, 1, 10, 100, 300, 1000):
        print(k, "cold", round(cold["energy"][k].item(), 2), round(cold["l0"][k].item(), 1), round(cold["psnr"][k].item(), 2),
              "| warm", round(E[k].item(), 2), round(L0[k].item(), 1), round(ps[k].item(), 2), flush=True)
torch.save(net.state_dict(), f"/tmp/wl/res/{tag}_ft_net.pt")
