"""Self-contained report.html: tables plus PNG figures embedded as base64 data URIs."""
from __future__ import annotations

import base64
import html
from typing import Any

from dcs.robustness.report.markdown import adaptive_note

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1100px;color:#222;padding:0 16px}
h1{font-size:1.5em;margin-bottom:4px} h2{font-size:1.15em;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0;font-size:0.9em} th,td{border:1px solid #ccc;padding:3px 8px;
text-align:right} th{background:#f3f3f3} td.l,th.l{text-align:left}
.pass{background:#e4f6e4} .warn{background:#fde8c8} .skip{background:#eee;color:#666}
.meta td{text-align:left} .headline{font-size:1.3em;margin:10px 0}
figure{margin:12px 0} figcaption{font-size:0.85em;color:#555} img{max-width:100%;height:auto}
code{font-size:0.9em}
"""


def _e(v: Any) -> str:
    return html.escape(str(v))


def _pct(v: Any) -> str:
    return "—" if v is None else f"{100 * float(v):.1f}"


def render(report_dict: dict, figures: list[tuple[str, str, bytes]]) -> str:
    d = report_dict
    pkg = d.get("package") or {}
    suite = d["suite"]
    title = f"Robustness report: {pkg.get('name', 'model')}" + (f" v{pkg['version']}" if "version" in pkg else "")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>",
             f"<style>{CSS}</style></head><body>", f"<h1>{_e(title)}</h1>"]
    head = d["headline"]
    parts.append(f"<p class='headline'>Clean accuracy <b>{_pct(d['clean_accuracy'])}%</b> · worst-case robust "
                 f"accuracy at ε={head['eps']:g}: <b>{_pct(head['robust_accuracy'])}%</b> "
                 f"({d['n_examples']} examples)</p>")
    cert_head = next((c for c in (d.get("certified") or {}).get("per_eps", [])
                      if abs(c["eps"] - head["eps"]) < 1e-9), None)
    if cert_head is not None:
        parts.append(f"<p>Certified robust accuracy at ε={head['eps']:g}: <b>{_pct(cert_head['certified_accuracy'])}%</b>"
                     f" · robust accuracy lies in [{_pct(cert_head['certified_accuracy'])}, "
                     f"{_pct(cert_head.get('empirical_robust_accuracy'))}]%</p>")
    meta = [("package sha256 (model.onnx)", pkg.get("sha256", "—")),
            ("gradient twin sha256", pkg.get("grad_sha256", "—")), ("path", pkg.get("path", "—")),
            ("suite", suite["name"]), ("ε sweep", ", ".join(f"{e:g}" for e in suite["eps"])),
            ("seed", d["seed"]), ("schema", d["schema_version"]), ("created", d["created_at"]),
            ("gradients / queries used", f"{d['totals']['gradients']} / {d['totals']['queries']}"),
            ("wall time", f"{d['totals']['wall_s']:.1f} s")]
    parts.append("<table class='meta'>" + "".join(f"<tr><th class='l'>{_e(k)}</th><td><code>{_e(v)}</code></td></tr>"
                                                  for k, v in meta) + "</table>")

    if d.get("adaptive"):
        parts.append(f"<p>{_e(adaptive_note(d).lstrip('- '))}</p>")
    parts.append("<h2>Gradient-masking checks</h2><table><tr><th class='l'>check</th><th>status</th>"
                 "<th class='l'>detail</th></tr>")
    for c in d["checks"]:
        parts.append(f"<tr class='{_e(c['status'])}'><td class='l'>{_e(c['name'])}</td>"
                     f"<td>{_e(c['status'].upper())}</td><td class='l'>{_e(c['detail'])}</td></tr>")
    if not d["checks"]:
        parts.append("<tr><td colspan='3' class='l'>checks disabled in this suite</td></tr>")
    parts.append("</table>")

    parts.append("<h2>Robust accuracy (%) per attack and ε</h2>")
    labels = list(dict.fromkeys(r["label"] for r in d["results"] if not r["fixed_eps"]))
    eps_list = sorted({r["eps"] for r in d["results"] if not r["fixed_eps"]})
    acc = {(r["label"], r["eps"]): r["robust_accuracy"] for r in d["results"]}
    parts.append("<table><tr><th class='l'>attack</th>" + "".join(f"<th>ε={e:g}</th>" for e in eps_list) + "</tr>")
    parts.append("<tr><td class='l'>clean</td>" + "".join(f"<td>{_pct(d['clean_accuracy'])}</td>" for _ in eps_list) + "</tr>")
    for label in labels:
        parts.append(f"<tr><td class='l'>{_e(label)}</td>" + "".join(f"<td>{_pct(acc.get((label, e)))}</td>" for e in eps_list) + "</tr>")
    wc = {w["eps"]: w["robust_accuracy"] for w in d["worst_case"]}
    parts.append("<tr><th class='l'>worst case</th>" + "".join(f"<th>{_pct(wc.get(e))}</th>" for e in eps_list) + "</tr></table>")

    parts.extend(_certified_html(d))

    parts.append("<h2>All results</h2><table><tr><th class='l'>attack</th><th>ε</th><th>n</th><th>robust acc %</th>"
                 "<th>success rate %</th><th>L2 dissim.</th><th>gradients</th><th>queries</th><th>wall s</th></tr>")
    for r in d["results"]:
        l2 = "—" if r["mean_l2_dissimilarity"] is None else f"{r['mean_l2_dissimilarity']:.3f}"
        parts.append(f"<tr><td class='l'>{_e(r['label'])}{' (targeted)' if r['targeted'] else ''}</td><td>{r['eps']:g}</td>"
                     f"<td>{r['examples_attacked']}</td><td>{_pct(r['robust_accuracy'])}</td>"
                     f"<td>{_pct(r['attack_success_rate'])}</td><td>{l2}</td><td>{r['gradients']}</td>"
                     f"<td>{r['queries']}</td><td>{r['wall_s']:.2f}</td></tr>")
    parts.append("</table><p style='font-size:0.85em;color:#555'>Success rate: fraction of originally-correct "
                 "predictions changed (BlurNet). L2 dissimilarity: mean ‖x−x_adv‖₂/‖x_adv‖₂ over originally-correct "
                 "examples.</p>")

    parts.append("<h2>Figures</h2>")
    for fid, caption, png in figures:
        b64 = base64.b64encode(png).decode("ascii")
        parts.append(f"<figure id='fig-{_e(fid)}'><img alt='{_e(fid)}' src='data:image/png;base64,{b64}'>"
                     f"<figcaption>{_e(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _certified_html(d: dict) -> list[str]:
    """The "Certified robustness" section: [certified, empirical] per ε (empty without certify)."""
    cert = d.get("certified")
    if not cert:
        return []
    out = ["<h2>Certified robustness (" + ("interval and CROWN bounds" if cert.get("margin") == "interval+crown"
                                           else "interval bounds") + ")</h2>"]
    if cert.get("status") != "ok":
        out.append(f"<p class='skip'>certify skipped: {_e(cert.get('reason'))}</p>")
        return out
    out.append("<p style='font-size:0.85em;color:#555'>Certified: examples whose true-class logit lower "
               "bound beats every other class's upper bound over the whole ε-ball (a provable lower bound, "
               f"method {_e(cert.get('method') or '—')}, {_e(cert.get('margin'))} margins). Empirical: worst "
               "case over the attacks (an upper bound). The true robust accuracy lies in the interval.</p>")
    unst = any(c.get("unstable_fraction") is not None for c in cert["per_eps"])
    many = len({c.get("method", "ibp") for c in cert["per_eps"]}) > 1  # ibp and crown (issue 27)
    out.append("<table><tr><th>ε</th>" + ("<th>method</th>" if many else "")
               + "<th>certified %</th><th>empirical %</th><th class='l'>interval %</th>"
               + ("<th>unstable activations %</th>" if unst else "") + "</tr>")
    for c in cert["per_eps"]:
        lo, hi = c["certified_accuracy"], c.get("empirical_robust_accuracy")
        u = c.get("unstable_fraction")
        u_cell = f"<td>{'—' if u is None else f'{100 * u:.2f}'}</td>" if unst else ""
        m_cell = f"<td>{_e(c.get('method', 'ibp'))}</td>" if many else ""
        out.append(f"<tr><td>{c['eps']:g}</td>{m_cell}<td>{_pct(lo)}</td><td>{_pct(hi)}</td>"
                   f"<td class='l'>[{_pct(lo)}, {_pct(hi)}]</td>{u_cell}</tr>")
    out.append("</table>")
    if cert.get("pfe_c") is not None:
        out.append(f"<p style='font-size:0.85em;color:#555'>Unstable: front-end activations z with "
                   f"| |z| − c | ≤ ε, c = {cert['pfe_c']:g} ({_e(cert.get('pfe_c_source'))}).</p>")
    return out
