import math, sys, torch
from d2gp.tasks import make_task
from d2gp.tasks.base import measure
from d2gp.preconditioners.files import load_npo
torch.set_num_threads(2)
task = make_task("spc", device="cpu")
den = task.denoiser()
x = task.images("test", limit=100)
y = measure(task.student, x, seed=10_000)
g0 = task.student_step_size

def psnr(a, b):
    mse = (a.clamp(0, 1) - b).flatten(1).pow(2).mean(1)
    return (10 * torch.log10(1 / mse)).mean().item()

@torch.no_grad()
def run(P, gamma, K, restart=None, marks=(20, 40, 100, 200)):
    xk = gamma * task.student.A_adjoint(y); z = xk; t = torch.ones(len(y)); rprev = torch.full((len(y),), math.inf)
    out = {}
    for k in range(K):
        g = task.student.A_adjoint(task.student.A(z) - y)
        pg = P(g, k) if P is not None else g
        xn = den(z - gamma * pg)
        tn = (1 + torch.sqrt(1 + 4 * t * t)) / 2
        mom = (t - 1) / tn
        if restart == "speed":
            r = (xn - xk).flatten(1).norm(dim=1)
            rs = r > rprev
            mom = torch.where(rs, torch.zeros_like(mom), mom); tn = torch.where(rs, torch.ones_like(tn), tn); rprev = r
        elif restart == "gradient":  # O'Donoghue-Candes: (z - x_new)·(x_new - x) > 0
            rs = ((z - xn) * (xn - xk)).flatten(1).sum(1) > 0
            mom = torch.where(rs, torch.zeros_like(mom), mom); tn = torch.where(rs, torch.ones_like(tn), tn)
        elif restart == "none-after-K" and k >= 20:
            mom = torch.zeros_like(mom)
        zn = xn + mom.view(-1, 1, 1, 1) * (xn - xk)
        xk, z, t = xn, zn, tn
        if k + 1 in marks: out[k + 1] = round(psnr(xk, x), 2)
    return out

runs = {"base": None, **{n: load_npo(p, task)[0] for n, p in
        [("e1-d2gp-tail1", "runs/e1/variants/spc/d2gp-seed0"), ("e1-tail10", "runs/e1/variants/spc/tail-10-seed0"),
         ("e1-sup-tail10", "runs/e1/variants/spc/supervised-tail-10-seed0"), ("e2-tail10sat", "runs/e2/variants/spc/tail-10-seed0"),
         ("e2-sup-tail10sat", "runs/e2/variants/spc/supervised-tail-10-seed0")]}}
for name, P in runs.items():
    gammas = [g0, 1.458 * g0] if P is None else [g0]
    for gamma in gammas:
        for rs in [None, "speed", "gradient", "none-after-K"]:
            print(name, f"γ={gamma/g0:.2f}", rs, run(P, gamma, 200, rs), flush=True)
