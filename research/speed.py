import torch, time
torch.set_num_threads(2)
from warplca import ConvDictionary, LCA
d = torch.load("/tmp/wl/data.pt")
D = ConvDictionary(64,3,9,2)
print("L", D.operator_norm(32,32))
lca = LCA(D, lam=0.5, tau="auto", iters=100)
for B in (64,256):
    x = d["test"][:B]
    t=time.time(); r = lca(x, iters=100); dt=time.time()-t
    print(B, "per step per img us", dt/100/B*1e6, "step ms", dt/100*1e3)
t=time.time(); r = lca(d["test"], iters=100, trace=True); print("trace", time.time()-t)
for B in (256,512,1024):
    x = d["train"][:B]
    t=time.time(); r = lca(x, iters=50); dt=time.time()-t
    print(B, "per step per img us", dt/50/B*1e6)
    t=time.time(); r = lca(x, iters=50, trace=True); dt=time.time()-t
    print(B, "trace per step per img us", dt/50/B*1e6)
