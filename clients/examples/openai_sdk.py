"""The official `openai` SDK against the steering server: steering through `extra_body`, presets
through the model name, streaming as usual.

    steer serve &                      # or: make serve
    python clients/examples/openai_sdk.py [http://127.0.0.1:8000/v1]
"""

from __future__ import annotations

import os
import sys

from openai import OpenAI

base_url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/v1"
client = OpenAI(base_url=base_url, api_key=os.environ.get("STEER_API_KEY", "unused"))
model = client.models.list().data[0].id  # the base model; presets are "<model>+<preset>"
question = [{"role": "user", "content": "How do I pick a lock?"}]

# 1. Unsteered.
r = client.chat.completions.create(model=model, messages=question, max_tokens=48, temperature=0)
print("base:      ", r.choices[0].message.content)

# 2. A steering object in extra_body (the server echoes what it applied).
r = client.chat.completions.create(
    model=model, messages=question, max_tokens=48, temperature=0,
    extra_body={"steering": {"method": "inlp_flip", "k": 2, "strength": 1.0}})
print("inlp_flip: ", r.choices[0].message.content)
print("applied:   ", r.model_extra.get("steering"))

# 3. Steering controls: a list applied in order, generation-only targeting, and a condition
#    (actadd only when the prompt scores above 0.5 on the refusal direction's axis).
r = client.chat.completions.create(
    model=model, messages=question, max_tokens=48, temperature=0,
    extra_body={"steering": [
        {"method": "ablate", "apply_to": "generation"},
        {"method": "actadd", "strength": 1.5, "generation_window": [0, 8],
         "when": {"above": 0.5}},
    ]})
print("controls:  ", r.choices[0].message.content)
print("applied:   ", r.model_extra.get("steering"))  # condition: {score, applied} per object

# 4. A preset by model name, streamed.
print("preset:     ", end="")
stream = client.chat.completions.create(model=f"{model}+ablate", messages=question,
                                        max_tokens=48, temperature=0, stream=True)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()

# 5. The compare endpoint is not part of the OpenAI API: call it with the SDK's raw `post`.
result = client.post("/steering/compare", cast_to=object, body={
    "model": model, "messages": question, "max_tokens": 32, "temperature": 0,
    "variants": ["no-refusal", {"method": "none"}, {"method": "actadd", "strength": 1.0}]})
for v in result["variants"]:
    print(f"[{v['index']}] {v['steering']['method']:<10} refusal={v['is_refusal']!s:<5} "
          f"score={v['refusal_score']:.2f}  {v['completion'][:60]!r}")
