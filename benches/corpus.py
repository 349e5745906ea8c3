#!/usr/bin/env python3
"""Builds the image corpus for `orlop bench --scenario images`, offline from
anything but Debian's packages: root filesystems made with debootstrap
(bookworm minbase, and minbase plus a few packages), each again after a
simulated upgrade (about 3% of the files under usr/ rewritten, the package
database changed), turned into OCI image layouts with real gzip layers:

  base-v1   [minbase]
  base-v2   [minbase upgraded]
  tools-v1  [minbase, +packages]              (shares its first layer with base-v1)
  tools-v2  [minbase upgraded, +packages upgraded]

Successive versions share most files but few whole layers, as real image
histories do. The corpus is cached (default ~/.cache/orlop-corpus, or
$ORLOP_CORPUS_DIR) and never committed; a second run reuses it.

Usage: benches/corpus.py [--dir DIR] [--mirror URL]
Prints the directory holding one OCI layout per image.
"""

import argparse
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys

SUITE = "bookworm"
PACKAGES = ["ca-certificates", "curl", "python3-minimal"]


def log(msg):
    print(f"corpus: {msg}", file=sys.stderr, flush=True)


def debootstrap(target, mirror, include=None):
    if os.path.exists(os.path.join(target, ".done")):
        return
    shutil.rmtree(target, ignore_errors=True)
    cmd = ["debootstrap", "--variant=minbase"]
    if include:
        cmd.append("--include=" + ",".join(include))
    cmd += [SUITE, target, mirror]
    log(f"debootstrap {os.path.basename(target)} (about 30 s)")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    # Mount points and caches hold nothing an image ships.
    for d in ["proc", "sys", "dev", "var/cache/apt/archives"]:
        p = os.path.join(target, d)
        if os.path.isdir(p):
            for e in os.listdir(p):
                q = os.path.join(p, e)
                if os.path.isfile(q) and not os.path.islink(q):
                    os.remove(q)
    open(os.path.join(target, ".done"), "w").close()


def upgraded(src, dst):
    """A copy of src in which about 3% of the regular files under usr/ and
    the package database changed, as after an upgrade."""
    if os.path.exists(os.path.join(dst, ".done")):
        return
    shutil.rmtree(dst, ignore_errors=True)
    log(f"simulated upgrade of {os.path.basename(src)}")
    subprocess.run(["cp", "-a", src, dst], check=True)
    changed = 0
    for root, _, files in os.walk(os.path.join(dst, "usr")):
        for f in files:
            p = os.path.join(root, f)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            rel = os.path.relpath(p, dst)
            if int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % 33 == 0:
                with open(p, "ab") as fh:
                    fh.write(b"\0orlop-corpus upgrade 2\0")
                changed += 1
    status = os.path.join(dst, "var/lib/dpkg/status")
    if os.path.exists(status):
        with open(status, "a") as fh:
            fh.write("\n# upgraded by the orlop corpus builder\n")
    log(f"{changed} files changed")
    open(os.path.join(dst, ".done"), "w").close()


def files_of(root):
    out = {}
    for r, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(r, name)
            out[os.path.relpath(p, root)] = p
    return out


def same(a, b):
    """Whether two paths hold the same thing (device nodes and fifos are
    compared by type and number, never read)."""
    sa, sb = os.lstat(a), os.lstat(b)
    if stat.S_IFMT(sa.st_mode) != stat.S_IFMT(sb.st_mode) or sa.st_mode != sb.st_mode:
        return False
    if stat.S_ISLNK(sa.st_mode):
        return os.readlink(a) == os.readlink(b)
    if stat.S_ISDIR(sa.st_mode):
        return True
    if not stat.S_ISREG(sa.st_mode):
        return sa.st_rdev == sb.st_rdev
    if sa.st_size != sb.st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def layer(out_dir, root, only=None):
    """A gzip tar of root (or of the listed paths only); returns
    (gzip bytes path, digest, size, diff id)."""
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, "layer.tmp")
    cmd = ["tar", "--sort=name", "--numeric-owner", "--exclude=./.done", "-C", root, "-cf", "-"]
    if only is None:
        cmd.append(".")
    else:
        # A file, not a pipe: tar writes while it reads the list.
        listing = os.path.join(out_dir, "files.tmp")
        with open(listing, "w") as f:
            f.write("\n".join("./" + p for p in sorted(only)) + "\n")
        cmd += ["--no-recursion", "--files-from", listing]
    tar = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    raw = hashlib.sha256()
    gz = subprocess.Popen(["gzip", "-n", "-6"], stdin=subprocess.PIPE, stdout=open(tmp, "wb"))
    while True:
        b = tar.stdout.read(1 << 20)
        if not b:
            break
        raw.update(b)
        gz.stdin.write(b)
    gz.stdin.close()
    if tar.wait() != 0 or gz.wait() != 0:
        raise SystemExit("tar or gzip failed")
    h = hashlib.sha256()
    with open(tmp, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return tmp, "sha256:" + h.hexdigest(), os.path.getsize(tmp), "sha256:" + raw.hexdigest()


def put_blob(layout, path_or_bytes):
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)
    if isinstance(path_or_bytes, bytes):
        d = hashlib.sha256(path_or_bytes).hexdigest()
        with open(os.path.join(blobs, d), "wb") as f:
            f.write(path_or_bytes)
        return "sha256:" + d, len(path_or_bytes)
    raise TypeError


def image(layout, name, layers):
    """An OCI layout at `layout` holding one image of the given layers
    (each as returned by `layer`), tagged `name`."""
    if os.path.exists(os.path.join(layout, "index.json")):
        return
    os.makedirs(os.path.join(layout, "blobs", "sha256"), exist_ok=True)
    descs, diff_ids = [], []
    for tmp, digest, size, diff_id in layers:
        dst = os.path.join(layout, "blobs", "sha256", digest.split(":")[1])
        if not os.path.exists(dst):
            shutil.copyfile(tmp, dst)
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                      "digest": digest, "size": size})
        diff_ids.append(diff_id)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": ["bash"], "Labels": {"org.orlop.corpus": name}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": f"orlop corpus layer {i}"} for i in range(len(layers))],
    }, sort_keys=True).encode()
    cd, cs = put_blob(layout, config)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": descs,
    }, sort_keys=True).encode()
    md, ms = put_blob(layout, manifest)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md, "size": ms,
            "annotations": {"org.opencontainers.image.ref.name": name}}]}, f)
    log(f"image {name}: {len(layers)} layers, {sum(l[2] for l in layers) / 1e6:.1f} MB gzip")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=os.environ.get(
        "ORLOP_CORPUS_DIR", os.path.expanduser("~/.cache/orlop-corpus")))
    ap.add_argument("--mirror", default="http://deb.debian.org/debian")
    a = ap.parse_args()
    root = os.path.join(a.dir, "rootfs")
    layers_dir = os.path.join(a.dir, "layers")
    out = os.path.join(a.dir, "layouts")
    if os.path.exists(os.path.join(out, ".done")):
        print(out)
        return
    os.makedirs(root, exist_ok=True)
    base, tools = os.path.join(root, "minbase"), os.path.join(root, "tools")
    base2, tools2 = os.path.join(root, "minbase-2"), os.path.join(root, "tools-2")
    debootstrap(base, a.mirror)
    debootstrap(tools, a.mirror, PACKAGES)
    upgraded(base, base2)
    upgraded(tools, tools2)

    def diff(upper, lower):
        lf, uf = files_of(lower), files_of(upper)
        return [p for p, full in uf.items() if p != ".done" and (p not in lf or not same(full, lf[p]))]

    def keep(tmp, name):
        dst = os.path.join(layers_dir, name)
        os.makedirs(layers_dir, exist_ok=True)
        os.replace(tmp[0], dst)
        return (dst,) + tmp[1:]

    log("gzip layers")
    l_base = keep(layer(layers_dir, base), "base.tar.gz")
    l_base2 = keep(layer(layers_dir, base2), "base-2.tar.gz")
    l_tools = keep(layer(layers_dir, tools, diff(tools, base)), "tools.tar.gz")
    l_tools2 = keep(layer(layers_dir, tools2, diff(tools2, base2)), "tools-2.tar.gz")
    image(os.path.join(out, "base-v1"), "base-v1", [l_base])
    image(os.path.join(out, "base-v2"), "base-v2", [l_base2])
    image(os.path.join(out, "tools-v1"), "tools-v1", [l_base, l_tools])
    image(os.path.join(out, "tools-v2"), "tools-v2", [l_base2, l_tools2])
    open(os.path.join(out, ".done"), "w").close()
    print(out)


if __name__ == "__main__":
    main()
