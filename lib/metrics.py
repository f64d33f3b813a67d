"""Training and evaluation metrics as running sums: the per-batch statistics of each task (loss,
accuracy, top-5, MSE) and the Meter that adds them up on the device and reads them as means.

A batch's statistics are *sums* on the device plus "count"; every reported metric is sum / count,
reduced across processes only when it is read (no host-device sync per step). The collectives
go through the runtime object the caller passes in (anything with rank, device and all_reduce_).
"""
import torch


class Meter:
    """Running per-key sums: one float64 vector on the device (one stack and one add per step, no
    host sync), the sample count on the host. Values are sums / count when read. A window (the
    steps since the last log line) is the difference to a snapshot, so it costs nothing per step."""

    def __init__(self):
        self.keys, self.sums, self.count = None, None, 0.0
        self._mark = (None, 0.0)

    def add(self, stats):
        if self.keys is None:
            self.keys = sorted(k for k in stats if k != "count")
        self.count += float(stats["count"])
        v = torch.stack([torch.as_tensor(stats[k], dtype=torch.float32) for k in self.keys])
        self.sums = v.double() if self.sums is None else self.sums.add_(v)

    def global_state(self, rt):
        """Sums, count and window mark of all ranks added up (a collective), as plain CPU values."""
        if self.keys is None:
            return None
        mark_sums, mark_count = self._mark
        mark_sums = torch.zeros_like(self.sums) if mark_sums is None else mark_sums
        t = torch.cat([self.sums, mark_sums, torch.tensor([self.count, mark_count], dtype=torch.float64,
                                                             device=self.sums.device)])
        rt.all_reduce_(t)
        n = len(self.keys)
        t = t.cpu()
        return {"keys": list(self.keys), "sums": t[:n].clone(), "mark_sums": t[n:2 * n].clone(),
                "count": float(t[2 * n]), "mark_count": float(t[2 * n + 1])}

    def load_global_state(self, d, rt):
        """Continue from global_state(): rank 0 carries the sums, the others start at zero."""
        if not d:
            return
        keep = rt.rank == 0
        self.keys = list(d["keys"])
        self.sums = (d["sums"] if keep else torch.zeros_like(d["sums"])).to(rt.device, torch.float64)
        self.count = d["count"] if keep else 0.0
        self._mark = ((d["mark_sums"] if keep else torch.zeros_like(d["mark_sums"])).to(rt.device, torch.float64),
                      d["mark_count"] if keep else 0.0)

    def read(self, rt, keep_count=False, since_mark=False):
        """Mean of each key over all samples of all ranks (a collective: every rank must call it);
        since_mark: over the samples added since the last call with since_mark (then mark now)."""
        if self.keys is None:
            return {}
        sums, count = self.sums, self.count
        if since_mark:
            mark_sums, mark_count = self._mark
            self._mark = (sums.clone(), count)
            if mark_sums is not None:
                sums, count = sums - mark_sums, count - mark_count
        t = torch.cat([sums, torch.tensor([count], dtype=torch.float64, device=sums.device)])
        rt.all_reduce_(t)
        values = dict(zip(self.keys + ["count"], t.tolist()))
        count = values.pop("count", 0.0)
        out = {k: v / count if count else float("nan") for k, v in values.items()}
        return {**out, "samples": int(count)} if keep_count else out


def classification_stats(out, y, loss, top5=False):
    """Per-batch sums: loss, top-1 correct (and top-5 correct at evaluation), and the sample count."""
    b = y.shape[0]
    if y.is_floating_point():                   # mixup / cutmix targets: the class of largest weight
        y = y.argmax(1)
    stats = {"loss": loss.detach() * b, "acc": (out.argmax(1) == y).sum(dtype=torch.float32), "count": b}
    if top5 and out.shape[1] >= 5:
        stats["top5"] = (out.topk(5, dim=1).indices == y[:, None]).any(1).sum(dtype=torch.float32)
    return stats


def regression_stats(out, y, loss, top5=False):
    """Per-batch sums: loss, squared error (mean over each sample's outputs), and the sample count."""
    b = y.shape[0]
    err = (out.detach().float() - y.float()) ** 2
    return {"loss": loss.detach() * b, "mse": err.reshape(b, -1).mean(1).sum(), "count": b}


STATS = {"classification": classification_stats, "regression": regression_stats}
