"""Instruction mix of the innermost loop that holds tensor-core MMAs (HMMA, or Hopper's
warpgroup HGMMA) in a
`cuobjdump -sass` listing of one kernel: the steady-state body of the flash-attention main
loop. A static count, not a timing: with mma.sync on Hopper the kernel is issue-bound, so
instructions per HMMA is the number to keep low. Usage: sass_loop_mix.py LISTING.sass"""
import re, sys, collections
lines = [l for l in open(sys.argv[1]) if re.match(r"\s+/\*[0-9a-f]{4}\*/", l)]
ins = []
for l in lines:
    m = re.match(r"\s+/\*([0-9a-f]{4})\*/\s+(@!?U?P[0-9T] )?([A-Z0-9_]+)([^;]*);", l)
    if m: ins.append((int(m.group(1), 16), m.group(3), m.group(4)))
MMA = ("HMMA", "HGMMA")
addr_idx = {a: i for i, (a, _, _) in enumerate(ins)}
best = None
for i, (a, op, rest) in enumerate(ins):
    if op == "BRA":
        t = re.search(r"0x([0-9a-f]+)", rest)
        if t and int(t.group(1), 16) < a:
            j = addr_idx.get(int(t.group(1), 16))
            if j is not None and any(o in MMA for _, o, _ in ins[j:i]):
                if best is None or (i - j) < (best[1] - best[0]): best = (j, i)
j, i = best
c = collections.Counter(o for _, o, _ in ins[j:i + 1])
n = i + 1 - j
op = max(MMA, key=lambda o: c[o])
print(f"loop: {n} instructions, {c[op]} {op} ({n / c[op]:.2f} per {op})")
print("  " + ", ".join(f"{k} {v}" for k, v in c.most_common(16)))
