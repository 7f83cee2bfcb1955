"""The instruction set of the real-teacher pipeline (pipelines/smollm2.mk): everyday
questions and tasks written for this project, composed from task templates and topics,
split into training prompts and held-out prompts (whose teacher answers the student never
sees). Deterministic; rerun to rebuild data/instructions/.

    python3 scripts/build_instructions.py
"""
import json
import random
from pathlib import Path

TOPICS = [
    "cooking pasta", "baking bread", "growing tomatoes", "caring for a cat", "training a puppy", "saving money",
    "making a budget", "learning a language", "running a first 5k", "sleeping better", "drinking enough water",
    "writing a cover letter", "preparing for a job interview", "planning a trip to Japan", "packing for a weekend",
    "cleaning a kitchen", "fixing a flat bicycle tire", "recycling plastic", "composting", "the water cycle",
    "photosynthesis", "the solar system", "volcanoes", "earthquakes", "rainbows", "the moon's phases", "tides",
    "electricity at home", "how a refrigerator works", "how vaccines work", "the human heart", "healthy breakfasts",
    "stretching after exercise", "meditation", "time management", "reading more books", "taking notes in class",
    "public speaking", "writing a thank-you note", "birthday party games", "choosing a houseplant", "the history of tea",
    "coffee brewing", "chess openings", "playing the guitar", "drawing a portrait", "taking better photos",
    "the French Revolution", "ancient Egypt", "the printing press", "the internet", "password safety",
    "backing up files", "spreadsheets", "email etiquette", "remote work", "recycling old phones", "electric cars",
    "wind power", "solar panels", "bees", "whales", "penguins", "dinosaurs", "the Amazon rainforest", "deserts",
    "snowflakes", "clouds", "weather forecasts", "first aid for a small cut", "packing a school lunch",
    "teaching a child to ride a bike", "making friends in a new city", "apologizing well", "giving feedback",
]
TEMPLATES = [
    "Explain {t} in two sentences.",
    "Give me three tips about {t}.",
    "What is the most common mistake people make with {t}?",
    "Write a short paragraph for a beginner about {t}.",
    "List the steps to get started with {t}.",
    "Why does {t} matter?",
    "Describe {t} to a ten-year-old.",
    "Write one sentence that summarizes {t}.",
]
FACTS = [
    "What is the capital of France?", "What is the capital of Japan?", "What is the capital of Italy?",
    "What is the capital of Canada?", "What is the capital of Spain?", "How many days are in a week?",
    "How many legs does a spider have?", "What color is the sky on a clear day?", "What is 7 times 8?",
    "What is 12 plus 30?", "What is the boiling point of water in Celsius?", "Which planet is closest to the sun?",
    "What is the largest ocean on Earth?", "Who wrote Romeo and Juliet?", "What gas do plants take in?",
    "How many continents are there?", "What is the freezing point of water in Fahrenheit?",
    "What is the opposite of hot?", "What do bees make?", "How many hours are in a day?",
    "Translate 'good morning' into French.", "Translate 'thank you' into Spanish.",
    "Name a fruit that is yellow.", "Name three primary colors.", "What is the plural of mouse?",
    "Spell the word 'necessary' backwards.", "Which is heavier, a kilogram of feathers or a kilogram of stone?",
    "What animal is known as the king of the jungle?", "How many minutes are in an hour?", "What is H2O?",
]
REWRITES = [
    "Rewrite this sentence to be more polite: Give me the report now.",
    "Rewrite this sentence in the past tense: I walk to the store.",
    "Correct the grammar: She don't like apples.",
    "Make this sentence shorter: In my personal opinion, I think that the movie was very good.",
    "Turn this into a question: The train leaves at noon.",
    "Write a haiku about autumn.", "Write a two-line poem about the sea.", "Write a limerick about a cat.",
    "Suggest a name for a bakery.", "Suggest a title for a story about a lost robot.",
    "Write a friendly reminder that the meeting is at 3 pm.", "Write a short birthday message for a friend.",
]


def main():
    rng = random.Random(2026)
    prompts = [t.format(t=topic) for topic in TOPICS for t in rng.sample(TEMPLATES, 4)]
    prompts += FACTS + REWRITES
    rng.shuffle(prompts)
    held = set(rng.sample(range(len(prompts)), len(prompts) // 8))
    out = Path(__file__).resolve().parent.parent / "data" / "instructions"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train_prompts.jsonl", "w") as tr, open(out / "heldout_prompts.jsonl", "w") as ho:
        for i, p in enumerate(prompts):
            rec = json.dumps({"id": f"inst{i:04d}", "prompt": p, "source": "instructions"}) + "\n"
            (ho if i in held else tr).write(rec)
    # Seeds for the teacher's own proposals: one request per topic.
    with open(out / "propose_prompts.jsonl", "w") as f:
        for i, topic in enumerate(TOPICS):
            f.write(json.dumps({"id": f"prop{i:03d}", "prompt": f"Write one short question a curious person might ask about {topic}."}) + "\n")
    print(f"{len(prompts) - len(held)} training prompts, {len(held)} held out, {len(TOPICS)} proposal seeds -> {out}")


if __name__ == "__main__":
    main()
