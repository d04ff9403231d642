"""Shared helpers for the warm-start probes (throwaway research code)."""
import math, time, json, os
import torch, torch.nn as nn, torch.nn.functional as F
torch.set_num_threads(2)
from warplca import ConvDictionary, LCA

DATA = "/tmp/wl/data.pt"
MEAN = None

def load_data():
    return torch.load(DATA)

def learn_dictionary(xtr, lam=0.5, steps=300, batch=64, lca_iters=30, lr=2e-3, seed=0, log_every=50):
    g = torch.Generator().manual_seed(seed)
    D = ConvDictionary(64, 3, 9, 2, seed=seed)
    opt = torch.optim.Adam(D.parameters(), lr=lr)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, xtr.shape[0], (batch,), generator=g)
        x = xtr[idx]
        lca = LCA(D, lam=lam, tau="auto", iters=lca_iters)
        a = lca(x).a
        loss = 0.5 * (x - D.decode(a)).pow(2).flatten(1).sum(1).mean()
        opt.zero_grad(); loss.backward(); opt.step(); D.normalize_()
        if step % log_every == 0 or step == steps - 1:
            l0 = (a != 0).float().flatten(1).sum(1).mean()
            print(f"dict step {step} loss {loss.item():.2f} l0 {l0:.1f} E {loss.item()+0.5*lam*lam*l0:.2f} t {time.time()-t0:.0f}s", flush=True)
    return D

def psnr(raw, recon_norm, mean):
    rec = (recon_norm + mean.view(1, 3, 1, 1)).clamp(0, 1)
    mse = (rec - raw).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-12)))

def ssim_batch(raw, recon_norm, mean):
    from skimage.metrics import structural_similarity
    rec = (recon_norm + mean.view(1, 3, 1, 1)).clamp(0, 1)
    vals = [structural_similarity(r.permute(1, 2, 0).numpy(), o.permute(1, 2, 0).numpy(), channel_axis=2, data_range=1.0)
            for r, o in zip(rec, raw)]
    return torch.tensor(vals)

def run_traced(lca, x, iters, u0=None, chunk=256, ks=(0, 1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000), raw=None, mean=None):
    """Run LCA, returning mean trace (energy, l0) over images at all steps, plus psnr at ks, and final u."""
    E, L0, us, ps = [], [], [], {}
    # psnr at chosen ks: run segments
    ks = [k for k in ks if k <= iters]
    for s in range(0, x.shape[0], chunk):
        xb = x[s:s + chunk]
        ub = None if u0 is None else u0[s:s + chunk]
        r = lca(xb, iters=iters, u0=ub, trace=True)
        E.append(r.trace["energy"]); L0.append(r.trace["l0"]); us.append(r.u)
    E = torch.cat(E, 1).mean(1); L0 = torch.cat(L0, 1).mean(1)
    return E, L0, torch.cat(us)

def psnr_at(lca, x, raw, mean, ks, u0=None, do_ssim=False):
    """PSNR (and SSIM) after k steps for each k in ks (runs incrementally)."""
    out = {}
    u = u0
    done = 0
    for k in sorted(ks):
        if k > done:
            r = lca(x, iters=k - done, u0=u)
            u = r.u; done = k
            rec = r.recon
        else:
            if u is None:
                rec = torch.zeros_like(x)
            else:
                a = lca.threshold(u); rec = lca.dictionary.decode(a).detach()
        out[k] = (psnr(raw, rec, mean).mean().item(), ssim_batch(raw, rec, mean).mean().item() if do_ssim else None)
    return out

def iters_to_match(Ew, target):
    idx = (Ew <= target).nonzero()
    return int(idx[0]) if len(idx) else None

# ---------------- predictor ----------------
class WarpCNN(nn.Module):
    def __init__(self, n_atoms=64, width=64, depth=3, drive=False, D=None):
        super().__init__()
        self.drive = drive
        self.D = D
        layers = [nn.Conv2d(3, width, 5, stride=2, padding=2), nn.GELU()]  # 32 -> 16
        for _ in range(depth):
            layers += [ResBlock(width)]
        self.body = nn.Sequential(*layers)
        cin = width + (n_atoms if drive else 0)
        self.head = nn.Conv2d(cin, n_atoms, 3, padding=1)
        nn.init.zeros_(self.head.bias)
    def forward(self, x):
        h = self.body(x)
        if self.drive:
            dr = self.D.encode(x).detach()
            h = torch.cat([h, dr], 1)
        return self.head(h)

class ResBlock(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.c1 = nn.Conv2d(w, w, 3, padding=1); self.c2 = nn.Conv2d(w, w, 3, padding=1)
    def forward(self, x):
        return x + self.c2(F.gelu(self.c1(F.gelu(x))))

def loss_fn(pred, tgt, kind, lam, gamma=3.0):
    if kind == "mse":
        return (pred - tgt).pow(2).mean()
    if kind == "l1":
        return (pred - tgt).abs().mean()
    if kind == "laplacian":
        w = torch.exp(tgt.abs() / (gamma * lam))
        return (w * (pred - tgt).pow(2)).sum() / w.sum()
    raise ValueError(kind)

def train_predictor(xtr, utr, lam, width=64, depth=3, loss="laplacian", gamma=3.0, epochs=30, batch=64, lr=2e-3,
                    drive=False, D=None, seed=0, wd=0.0, log=True, time_limit=None):
    torch.manual_seed(seed)
    net = WarpCNN(64, width, depth, drive, D)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=wd)
    n = xtr.shape[0]
    steps = epochs * math.ceil(n / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time(); it = 0
    for ep in range(epochs):
        perm = torch.randperm(n, generator=g)
        tot = 0.0
        for s in range(0, n, batch):
            idx = perm[s:s + batch]
            xb, ub = xtr[idx], utr[idx]
            if True:  # flip augmentation (hflip: states flip too? atoms are not symmetric -> no aug)
                pass
            l = loss_fn(net(xb), ub, loss, lam, gamma)
            opt.zero_grad(); l.backward(); opt.step(); sched.step(); it += 1
            tot += l.item() * len(idx)
        if log and (ep % 5 == 0 or ep == epochs - 1):
            print(f"  ep {ep} loss {tot/n:.4f} t {time.time()-t0:.0f}s", flush=True)
        if time_limit and time.time() - t0 > time_limit:
            print("  time limit at ep", ep); break
    net.eval()
    return net, time.time() - t0

@torch.no_grad()
def predict(net, x, chunk=512):
    return torch.cat([net(x[s:s + chunk]) for s in range(0, x.shape[0], chunk)])

def continuation_states(D, x, lam, iters, lam0_factor=4.0, tau="auto", frac=0.7, chunk=512):
    """λ-continuation: anneal λ geometrically from lam0_factor*lam to lam over frac*iters steps, then hold."""
    n_anneal = int(frac * iters)
    n_stages = 10
    us = []
    for s in range(0, x.shape[0], chunk):
        xb = x[s:s + chunk]; u = None
        for j in range(n_stages):
            l = lam * lam0_factor ** (1 - j / (n_stages - 1))
            u = LCA(D, lam=l, tau=tau)(xb, iters=n_anneal // n_stages, u0=u).u
        u = LCA(D, lam=lam, tau=tau)(xb, iters=iters - n_anneal // n_stages * n_stages, u0=u).u
        us.append(u)
    return torch.cat(us)

def cold_states(D, x, lam, iters, tau="auto", chunk=512):
    lca = LCA(D, lam=lam, tau=tau)
    return torch.cat([lca(x[s:s + chunk], iters=iters).u for s in range(0, x.shape[0], chunk)])

def append_findings(text):
    with open(os.path.join(os.path.dirname(__file__), "FINDINGS.md"), "a") as f:
        f.write(text + "\n")
