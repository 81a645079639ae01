"""Convert a model file into a torch.export archive with superlinear attention, then load it back.

Run:  python examples/convert_file.py [--out-dir DIR]   (DIR is made if missing)

The same as the command line:
    slcompile convert model.pt2 -o model.sl.pt2 --window 64 --topk 4 --dense-below 0

Steps: export a model to ``model.pt2`` with a dynamic sequence length (what you would ship), convert
it with ``slcompile.convert.convert_file`` (rewrite, re-export, atomic write, load-back check),
then load the result in a fresh-looking way: ``import slcompile`` registers the custom ops, and
``torch.export.load`` does the rest. The converted program runs at any sequence length.
"""

import argparse
import os
import tempfile

import torch

import slcompile  # registers torch.ops.superlinear, needed by torch.export.load below
from slcompile.convert import convert_file
from slcompile.demo import tiny_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=None, help="where to write the files (default: a temp dir)")
    args = ap.parse_args()
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="slcompile-example-")
    try:
        os.makedirs(out_dir, exist_ok=True)  # a new folder is made; a file in the way is an error
    except OSError as e:
        ap.error(f"--out-dir {out_dir}: cannot make the folder ({e.strerror or e})")

    # 1. A model file, as a user would have it: torch.export with a dynamic sequence dimension.
    model = tiny_model(seed=0)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 128))
    seq = torch.export.Dim("seq", min=2, max=65536)
    src = os.path.join(out_dir, "model.pt2")
    torch.export.save(torch.export.export(model, (ids,), dynamic_shapes=({1: seq},)), src)

    # 2. Convert it.
    config = slcompile.SuperlinearConfig(window=64, topk=4, dense_below=0)  # sparse at these lengths
    dst = os.path.join(out_dir, "model.sl.pt2")
    result = convert_file(src, dst, config, overwrite=True)
    rep = result.report
    print(f"{rep['rewritten']}/{rep['found']} attention sites rewritten -> {dst} "
          f"({result.output_bytes:,} bytes, sequence length "
          f"{'dynamic' if result.dynamic else 'static'})")

    # 3. Load and run it at another length, next to the original.
    converted = torch.export.load(dst).module()
    original = torch.export.load(src).module()
    ids = torch.randint(0, model.cfg.vocab_size, (1, 512))
    with torch.no_grad():
        a, b = original(ids), converted(ids)
    print(f"L=512: max |converted - original| = {(a - b).abs().max():.3g}, "
          f"next-token agreement {(a.argmax(-1) == b.argmax(-1)).float().mean():.3f}")


if __name__ == "__main__":
    main()
