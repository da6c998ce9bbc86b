"""BFCL v4 multi-turn -> OpenAI chat JSONL: {"id","tools","messages","ground_truth"}.
Usage: python bfcl_to_openai.py OUT.jsonl [category ...]

Data source: the `bfcl-eval` package (Berkeley Function Calling Leaderboard, BFCL v4).
The BFCL data is licensed Apache-2.0 (see bfcl_eval/data/README.md in that package).
Ground-truth calls are replayed through BFCL's pure-Python tool simulators to get real tool results.
Needs: pip install --no-deps bfcl-eval && pip install mpmath==1.3.0
"""
import ast, copy, json, sys, importlib.resources as ir
from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_utils import execute_multi_turn_func_call
from bfcl_eval.constants.executable_backend_config import MULTI_TURN_FUNC_DOC_FILE_MAPPING

DATA = ir.files("bfcl_eval") / "data"
TYPE_MAP = {"dict": "object", "float": "number", "tuple": "array", "any": "string"}

def fix_schema(s):  # BFCL uses "dict"/"float"; OpenAI JSON Schema wants "object"/"number"
    if isinstance(s, dict):
        s = {k: fix_schema(v) for k, v in s.items()}
        if isinstance(s.get("type"), str):
            s["type"] = TYPE_MAP.get(s["type"], s["type"])
        return s
    return [fix_schema(v) for v in s] if isinstance(s, list) else s

def jsonl(path):
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]

def tools_for(classes):
    return [{"type": "function", "function": {"name": fn["name"], "description": fn["description"],
             "parameters": fix_schema(fn["parameters"])}}
            for c in classes
            for fn in jsonl(DATA / "multi_turn_func_doc" / MULTI_TURN_FUNC_DOC_FILE_MAPPING[c])]

def call_to_openai(call_str, idx, tools):
    node = ast.parse(call_str, mode="eval").body
    name = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
    args = {}
    if node.args:  # a few ground-truth calls are positional, e.g. sort('x'): map by schema order
        order = next(list(t["function"]["parameters"].get("properties", {}))
                     for t in tools if t["function"]["name"] == name)
        args.update(zip(order, (ast.literal_eval(a) for a in node.args)))
    args.update({kw.arg: ast.literal_eval(kw.value) for kw in node.keywords})
    return {"id": f"call_{idx}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)}}

def convert(category):
    qs = jsonl(DATA / f"BFCL_v4_{category}.json")
    gts = {g["id"]: g["ground_truth"] for g in jsonl(DATA / "possible_answer" / f"BFCL_v4_{category}.json")}
    for e in qs:
        msgs, n, tools = [], 0, tools_for(e["involved_classes"])
        for turn_msgs, gt_calls in zip(e["question"], gts[e["id"]]):
            msgs.extend(copy.deepcopy(turn_msgs))
            results, _ = execute_multi_turn_func_call(
                gt_calls, e["initial_config"], e["involved_classes"], "export", e["id"],
                long_context="long_context" in category, is_evaL_run=False)
            for call, res in zip(gt_calls, results):
                tc = call_to_openai(call, n, tools); n += 1
                msgs.append({"role": "assistant", "content": None, "tool_calls": [tc]})
                msgs.append({"role": "tool", "tool_call_id": tc["id"], "content": res})
        yield {"id": e["id"], "tools": tools, "messages": msgs, "ground_truth": gts[e["id"]]}

if __name__ == "__main__":
    cats = sys.argv[2:] or ["multi_turn_base", "multi_turn_long_context",
                            "multi_turn_miss_func", "multi_turn_miss_param"]
    with open(sys.argv[1], "w") as f:
        for c in cats:
            for rec in convert(c):
                f.write(json.dumps(rec) + "\n")
