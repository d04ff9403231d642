import torch, time
from warplca.data.natural import NaturalDataModule
t=time.time()
dm = NaturalDataModule(n_train=4096, n_val=256, n_test=256)
norm = dm.normalization
out = {}
for s in ("train","val","test"):
    x,_ = dm.tensor(s)
    out[s] = norm.apply(x)
    out[s+"_raw"] = x
out["mean"] = torch.tensor(norm.mean)
print({k:v.shape for k,v in out.items() if v is not None}, norm, time.time()-t)
torch.save(out, "/tmp/wl/data.pt")
