"""Writes data/bundled_sft.jsonl: a small synthetic SFT set the tiny preset visibly learns in a few hundred CPU steps.

Short deterministic tasks (reverse, sort, add, uppercase, count, repeat) in the `messages` format, some with a system
prompt and some multi-turn, so the default run exercises the chat template and the assistant-only loss mask.
Run: python data/make_bundled_data.py  (seeded: the output is the same every time)
"""
import json
import random
from pathlib import Path

WORDS = ("apple river stone cloud tiger maple orbit lemon piano rocket sugar violet winter zebra amber cedar "
         "delta ember frost grape harbor ivory jungle koala lunar meadow nectar ocean pepper quartz").split()


def task(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(("reverse", "sort", "add", "upper", "count", "repeat"))
    if kind == "reverse":
        items = rng.sample(WORDS, rng.randint(2, 5))
        return f"Reverse the order: {' '.join(items)}", " ".join(reversed(items))
    if kind == "sort":
        numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
        return f"Sort ascending: {' '.join(map(str, numbers))}", " ".join(map(str, sorted(numbers)))
    if kind == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"What is {a} + {b}?", str(a + b)
    if kind == "upper":
        word = rng.choice(WORDS)
        return f"Uppercase: {word}", word.upper()
    if kind == "count":
        items = rng.sample(WORDS, rng.randint(1, 8))
        return f"How many words: {' '.join(items)}", str(len(items))
    word, times = rng.choice(WORDS), rng.randint(2, 4)
    return f"Repeat {word} {times} times.", " ".join([word] * times)


def conversation(rng: random.Random) -> dict:
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": "You are a precise assistant. Answer with the result only."})
    for _ in range(1 if rng.random() < 0.8 else 2):
        question, answer = task(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def main(rows: int = 2000, seed: int = 0) -> None:
    rng = random.Random(seed)
    path = Path(__file__).resolve().parent / "bundled_sft.jsonl"
    with open(path, "w") as file:
        for _ in range(rows):
            file.write(json.dumps(conversation(rng)) + "\n")
    print(f"wrote {rows} rows to {path}")


if __name__ == "__main__":
    main()
