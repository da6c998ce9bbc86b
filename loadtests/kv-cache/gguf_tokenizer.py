#!/usr/bin/env python3
"""Writes a model's own tokenizer as a Hugging Face `tokenizer.json`, built from its GGUF file's
metadata (vocabulary, merges, pre-tokeniser type) with transformers' GGUF tokenizer mapping, for
ctxgate's `compression.tokenizer`. The GGUF packages installed here ship no tokenizer.json.
transformers' own GGUF reader imports torch; the metadata is read with the `gguf` package instead.

  .work/venv/bin/python gguf_tokenizer.py MODEL.gguf OUT/tokenizer.json [--check http://127.0.0.1:PORT]

--check compares counts with a running llama-server's POST /tokenize (same model) on sample texts.
"""
import argparse
import json
import os
import sys
import types
import urllib.request

from gguf import GGUFReader, GGUFValueType


def read_gguf_metadata(path, _full=()):
    reader = GGUFReader(path)
    meta = {}
    for key, field in reader.fields.items():
        if not field.types:
            continue
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            if field.types[-1] == GGUFValueType.STRING:
                meta[key] = [bytes(field.parts[i]).decode("utf-8", "surrogateescape") for i in field.data]
            else:
                meta[key] = [field.parts[i].tolist()[0] for i in field.data]
        elif kind == GGUFValueType.STRING:
            meta[key] = bytes(field.parts[field.data[0]]).decode("utf-8")
        else:
            meta[key] = field.parts[field.data[0]].tolist()[0]
    return meta, None


stub = types.ModuleType("transformers.integrations.gguf.reader")
stub.read_gguf_metadata = read_gguf_metadata
sys.modules["transformers.integrations.gguf.reader"] = stub
from transformers.integrations.gguf.gguf_tokenizer_mapping import (  # noqa: E402
    convert_gguf_tokenizer, get_gguf_tokenizer)

SAMPLES = [
    "hello world",
    "\x1b[32mINFO\x1b[0m 2026-12-06T04:21:48Z auth.thunder: started in 12ms\n\n\n   heartbeat ok\r\n",
    'fn main() {\n    let x = vec![1, 2, 3];\n    println!("{x:?}");\n}\n',
    '{"role":"tool","content":"{\\"ok\\":true,\\"items\\":[1,2,3]}","tool_call_id":"call_9"}',
    "It's the user's job; they'll see. 中文文本 emoji 🎉 Ünïcödé",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("out")
    ap.add_argument("--check", help="llama-server base URL serving the same model")
    args = ap.parse_args()
    arch, tok, _ = get_gguf_tokenizer(args.gguf)
    backend, _ = convert_gguf_tokenizer(arch, tok)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    backend.save(args.out)
    print(f"{args.out}: {arch}, {tok.get('tokenizer_type')}/{tok.get('pre_tokenizer_type')}, "
          f"{backend.get_vocab_size()} tokens", file=sys.stderr)
    if args.check:
        bad = 0
        for text in SAMPLES:
            body = json.dumps({"content": text, "add_special": False}).encode()
            req = urllib.request.Request(args.check.rstrip("/") + "/tokenize", body, {"Content-Type": "application/json"})
            server = len(json.load(urllib.request.urlopen(req, timeout=60))["tokens"])
            ours = len(backend.encode(text, add_special_tokens=False).ids)
            bad += server != ours
            print(f"  {ours:5d} here, {server:5d} llama-server: {text[:40]!r}", file=sys.stderr)
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
