"""Writes data/targeted/targeted.jsonl: the project's targeted evaluation set.

Short factual and instruction-following prompts with reference answers (`answer`, or
`answers` when several spellings are right) across everyday topics, and a few open prompts
with a long `reference`. Written for this project (facts anyone can check); replace it with
your own records of the same shape (docs/FORMATS.md, "Targeted sets").

    python scripts/targeted_set.py            # rewrites data/targeted/targeted.jsonl
"""
import json
import pathlib

SHORT = " Answer with a word or a short phrase."

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Canada", "Ottawa"),
    ("Australia", "Canberra"), ("Greece", "Athens"), ("Ireland", "Dublin"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Hungary", "Budapest"),
    ("the United Kingdom", "London"), ("the United States", "Washington, D.C."), ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Kenya", "Nairobi"), ("South Korea", "Seoul"), ("Thailand", "Bangkok"),
    ("India", "New Delhi"), ("Turkey", "Ankara"), ("Brazil", "Brasília"), ("the Netherlands", "Amsterdam"), ("Belgium", "Brussels"),
    ("Switzerland", "Bern"), ("Cuba", "Havana"), ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"), ("Iceland", "Reykjavik"),
    ("New Zealand", "Wellington"), ("Morocco", "Rabat"), ("Nigeria", "Abuja"), ("Pakistan", "Islamabad"),
    ("the Philippines", "Manila"), ("Colombia", "Bogotá"), ("Ukraine", "Kyiv"), ("the Czech Republic", "Prague"),
    ("Romania", "Bucharest"), ("Scotland", "Edinburgh"), ("Venezuela", "Caracas"),
]
ALIASES = {"Washington, D.C.": ["Washington, D.C.", "Washington"], "Brasília": ["Brasília", "Brasilia"], "New Delhi": ["New Delhi", "Delhi"],
           "Bogotá": ["Bogotá", "Bogota"], "Kyiv": ["Kyiv", "Kiev"]}

NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty".split()


def number_answers(n):
    return [str(n)] + ([NUMBER_WORDS[n]] if 0 <= n < len(NUMBER_WORDS) else [])


ARITHMETIC = (
    [(f"What is {a} plus {b}?", a + b) for a, b in [(2, 3), (4, 5), (7, 6), (8, 8), (9, 3), (12, 7), (15, 5), (20, 30), (11, 11), (6, 7)]]
    + [(f"What is {a} minus {b}?", a - b) for a, b in [(9, 4), (10, 3), (15, 8), (20, 5), (7, 7), (50, 25), (18, 9), (13, 6)]]
    + [(f"What is {a} times {b}?", a * b) for a, b in [(3, 4), (5, 5), (6, 2), (7, 3), (9, 9), (10, 10), (8, 4), (2, 11)]]
    + [(f"What is {a} divided by {b}?", a // b) for a, b in [(10, 2), (12, 3), (20, 4), (81, 9), (100, 10), (18, 6)]]
)

FACTS = {
    "science": [
        ("Which planet is known as the Red Planet?", ["Mars"]),
        ("What is the largest planet in our solar system?", ["Jupiter"]),
        ("Which planet is closest to the Sun?", ["Mercury"]),
        ("What gas do plants take in from the air to make food?", ["carbon dioxide", "CO2"]),
        ("What gas do humans need to breathe to live?", ["oxygen"]),
        ("What is the chemical symbol for gold?", ["Au"]),
        ("What is the chemical symbol for water?", ["H2O"]),
        ("At what temperature in degrees Celsius does water boil at sea level?", ["100", "100 degrees Celsius", "one hundred"]),
        ("At what temperature in degrees Celsius does water freeze?", ["0", "zero", "0 degrees Celsius"]),
        ("What is the closest star to Earth?", ["the Sun", "Sun"]),
        ("What force pulls objects toward the Earth?", ["gravity"]),
        ("What organ pumps blood through the human body?", ["heart", "the heart"]),
        ("How many bones are in the adult human body?", ["206"]),
        ("What is the hardest natural substance?", ["diamond"]),
        ("What do bees make from nectar?", ["honey"]),
        ("What is the natural satellite of the Earth called?", ["the Moon", "Moon"]),
        ("What part of the plant absorbs water from the soil?", ["roots", "the roots", "root"]),
        ("What is frozen water called?", ["ice"]),
        ("Which organ do humans use to breathe?", ["lungs", "the lungs"]),
        ("What is the largest ocean on Earth?", ["Pacific Ocean", "Pacific", "the Pacific Ocean"]),
        ("What is the tallest mountain in the world?", ["Mount Everest", "Everest"]),
        ("What is the longest river in Africa?", ["Nile", "the Nile", "Nile River"]),
        ("How many continents are there on Earth?", ["7", "seven"]),
        ("What is the largest desert in Africa?", ["Sahara", "the Sahara", "Sahara Desert"]),
        ("What kind of animal is a whale: a fish or a mammal?", ["mammal", "a mammal"]),
        ("What do caterpillars turn into?", ["butterflies", "butterfly", "moths", "butterflies or moths"]),
        ("How many legs does an insect have?", ["6", "six"]),
        ("How many legs does a spider have?", ["8", "eight"]),
        ("What is the largest land animal?", ["elephant", "African elephant", "the African elephant"]),
        ("What is the fastest land animal?", ["cheetah", "the cheetah"]),
    ],
    "everyday": [
        ("How many days are in a week?", number_answers(7)),
        ("How many months are in a year?", number_answers(12)),
        ("How many hours are in a day?", ["24", "twenty-four"]),
        ("How many minutes are in an hour?", ["60", "sixty"]),
        ("How many seconds are in a minute?", ["60", "sixty"]),
        ("How many days are in a leap year?", ["366"]),
        ("What is the first month of the year?", ["January"]),
        ("What is the last month of the year?", ["December"]),
        ("Which day comes after Monday?", ["Tuesday"]),
        ("Which day comes before Sunday?", ["Saturday"]),
        ("What color is the sky on a clear day?", ["blue"]),
        ("What color is grass?", ["green"]),
        ("What color is a ripe banana?", ["yellow"]),
        ("What color do you get by mixing blue and yellow?", ["green"]),
        ("What color do you get by mixing red and white?", ["pink"]),
        ("What animal says moo?", ["cow", "a cow"]),
        ("What animal barks?", ["dog", "a dog"]),
        ("What is a baby cat called?", ["kitten"]),
        ("What is a baby dog called?", ["puppy"]),
        ("What is a baby cow called?", ["calf"]),
        ("How many sides does a triangle have?", number_answers(3)),
        ("How many sides does a square have?", number_answers(4)),
        ("How many sides does a hexagon have?", number_answers(6)),
        ("How many wheels does a bicycle have?", number_answers(2)),
        ("How many players are on a soccer team on the field?", number_answers(11)),
        ("How many cents are in a dollar?", ["100", "one hundred"]),
        ("What do you call a doctor who treats teeth?", ["dentist", "a dentist"]),
        ("What do you use to cut paper?", ["scissors"]),
        ("What do you call the meal eaten in the morning?", ["breakfast"]),
        ("Which season comes after winter?", ["spring"]),
        ("Which season is the hottest?", ["summer"]),
        ("What is the opposite of north?", ["south"]),
        ("What instrument has black and white keys?", ["piano", "the piano"]),
        ("What fruit is used to make wine?", ["grapes", "grape"]),
        ("What is the main ingredient of guacamole?", ["avocado", "avocados"]),
    ],
    "language": [
        ("What is the opposite of hot?", ["cold"]),
        ("What is the opposite of big?", ["small", "little"]),
        ("What is the opposite of up?", ["down"]),
        ("What is the opposite of happy?", ["sad", "unhappy"]),
        ("What is the opposite of fast?", ["slow"]),
        ("What is the opposite of light?", ["dark", "heavy"]),
        ("What is the opposite of open?", ["closed", "shut", "close"]),
        ("What is the opposite of early?", ["late"]),
        ("What is the opposite of empty?", ["full"]),
        ("What is the opposite of young?", ["old"]),
        ("What is the plural of mouse?", ["mice"]),
        ("What is the plural of child?", ["children"]),
        ("What is the plural of tooth?", ["teeth"]),
        ("What is the plural of foot?", ["feet"]),
        ("What is the plural of woman?", ["women"]),
        ("What is the plural of goose?", ["geese"]),
        ("What is the past tense of go?", ["went"]),
        ("What is the past tense of eat?", ["ate"]),
        ("What is the past tense of run?", ["ran"]),
        ("What is the past tense of see?", ["saw"]),
        ("What is a synonym of big?", ["large", "huge", "enormous", "giant"]),
        ("What is a synonym of happy?", ["glad", "joyful", "cheerful", "content"]),
        ("Translate 'thank you' into French.", ["merci"]),
        ("Translate 'hello' into Spanish.", ["hola"]),
        ("Translate 'cat' into German.", ["Katze"]),
        ("Translate 'water' into Spanish.", ["agua"]),
        ("How do you say 'goodbye' in Italian?", ["arrivederci", "ciao"]),
        ("What language is spoken in Brazil?", ["Portuguese"]),
        ("What language is spoken in Mexico?", ["Spanish"]),
    ],
    "people and history": [
        ("Who wrote Romeo and Juliet?", ["William Shakespeare", "Shakespeare"]),
        ("Who painted the Mona Lisa?", ["Leonardo da Vinci", "da Vinci", "Leonardo"]),
        ("Who was the first president of the United States?", ["George Washington", "Washington"]),
        ("Who developed the theory of relativity?", ["Albert Einstein", "Einstein"]),
        ("Who was the first person to walk on the Moon?", ["Neil Armstrong", "Armstrong"]),
        ("In what year did World War II end?", ["1945"]),
        ("In what year did Christopher Columbus first reach the Americas?", ["1492"]),
        ("Who wrote the Harry Potter books?", ["J.K. Rowling", "Rowling", "JK Rowling"]),
        ("Who discovered penicillin?", ["Alexander Fleming", "Fleming"]),
        ("Who composed the Fifth Symphony that begins with four famous notes?", ["Beethoven", "Ludwig van Beethoven"]),
        ("Which ancient civilization built the pyramids of Giza?", ["Egyptians", "ancient Egyptians", "Egypt", "the ancient Egyptians"]),
        ("What was the name of the ship that sank in 1912 after hitting an iceberg?", ["Titanic", "the Titanic", "RMS Titanic"]),
        ("Who invented the telephone?", ["Alexander Graham Bell", "Bell", "Graham Bell"]),
        ("Who is known for the theory of evolution by natural selection?", ["Charles Darwin", "Darwin"]),
        ("In which city is the Eiffel Tower?", ["Paris"]),
        ("In which country is the Great Wall?", ["China"]),
        ("In which country is the Colosseum?", ["Italy"]),
        ("In which city is the Statue of Liberty?", ["New York", "New York City"]),
        ("What currency is used in Japan?", ["yen", "Japanese yen"]),
        ("What currency is used in the United Kingdom?", ["pound", "pound sterling", "pounds", "British pound"]),
    ],
    "instructions": [
        ("Repeat the word 'banana' and nothing else.", ["banana"]),
        ("Repeat the word 'river' and nothing else.", ["river"]),
        ("Say only the word 'yes'.", ["yes"]),
        ("Write the word 'hello' in capital letters.", ["HELLO"]),
        ("Spell the word 'cat' backwards.", ["tac"]),
        ("Spell the word 'dog' backwards.", ["god"]),
        ("What comes next: one, two, three, ...?", ["four"]),
        ("What comes next: Monday, Tuesday, Wednesday, ...?", ["Thursday"]),
        ("What comes next: 2, 4, 6, 8, ...?", ["10", "ten"]),
        ("What comes next: A, B, C, ...?", ["D"]),
        ("Which word does not belong: apple, banana, carrot, cherry?", ["carrot"]),
        ("Which word does not belong: red, blue, dog, green?", ["dog"]),
        ("Which is larger, 7 or 12?", ["12", "twelve"]),
        ("Which is smaller, 3 or 9?", ["3", "three"]),
        ("Which is heavier, a kilogram of feathers or a kilogram of stones?", ["neither", "they weigh the same", "same", "both weigh the same"]),
        ("Name the color of snow in one word.", ["white"]),
        ("Name a primary color.", ["red", "blue", "yellow"]),
        ("Give one word that rhymes with 'cat'.", ["hat", "bat", "mat", "rat", "sat", "fat", "pat", "that", "flat", "chat"]),
        ("How many letters are in the word 'dog'?", number_answers(3)),
        ("How many vowels are in the word 'banana'?", number_answers(3)),
        ("Put these numbers in order from smallest to largest: 3, 1, 2.", ["1, 2, 3", "1 2 3"]),
        ("Answer yes or no: is the Sun a star?", ["yes"]),
        ("Answer yes or no: can fish breathe air like humans?", ["no"]),
        ("Answer yes or no: is ice cold?", ["yes"]),
        ("Answer true or false: a week has eight days.", ["false"]),
    ],
}

LONG = [
    ("Explain in one sentence why the sky is blue.",
     "Sunlight is scattered by the molecules of the air, and blue light is scattered much more than red light, so the sky looks blue."),
    ("In one or two sentences, why do we have seasons?",
     "The Earth's axis is tilted, so as it orbits the Sun each hemisphere gets more direct sunlight and longer days for part of the year (summer) and less for another part (winter)."),
    ("Briefly, what does a thermometer measure?", "A thermometer measures temperature: how hot or cold something is."),
    ("Describe in one sentence what photosynthesis is.",
     "Photosynthesis is the process by which plants use sunlight, water and carbon dioxide to make sugar and release oxygen."),
    ("In one sentence, why should you wash your hands before eating?",
     "Washing your hands removes germs that could otherwise get into your mouth with your food and make you sick."),
    ("Give two tips for sleeping better.", "Go to bed at the same time every night, and avoid screens and caffeine in the hour before sleep."),
    ("In one sentence, what is a noun?", "A noun is a word that names a person, place, thing or idea."),
    ("In one sentence, what does a volcano do?", "A volcano is an opening in the Earth's crust through which molten rock, ash and gas erupt."),
    ("Briefly explain what recycling is.", "Recycling is collecting used materials such as paper, glass and plastic and processing them so they can be made into new products."),
    ("In one sentence, why do we need to drink water?",
     "The body needs water to keep its temperature steady, carry nutrients, remove waste and keep organs working."),
    ("Explain in one sentence what a map is.", "A map is a drawing of an area that shows where places, roads and features are in relation to each other."),
    ("In one sentence, what is the difference between weather and climate?",
     "Weather is the state of the air on a given day, while climate is the typical weather of a place over many years."),
    ("Briefly, why do leaves change color in autumn?",
     "In autumn trees stop making green chlorophyll, so the yellow and orange pigments in the leaves show and some leaves make red ones."),
    ("In one sentence, what does a bank do?", "A bank keeps people's money safe, lends money to people and businesses, and pays interest on savings."),
    ("Give a one-sentence definition of a friend.", "A friend is someone you know, like and trust, who cares about you and spends time with you."),
    ("In one sentence, what is exercise good for?", "Exercise strengthens the heart, muscles and bones, helps control weight, and improves mood and sleep."),
    ("Briefly, how does a refrigerator keep food fresh?",
     "A refrigerator keeps food cold, which slows the growth of the bacteria that make food spoil."),
    ("In one sentence, what is the Internet?", "The Internet is a worldwide network of connected computers that share information."),
    ("In one sentence, why do we brush our teeth?", "Brushing removes food and plaque from the teeth, which prevents cavities and gum disease."),
    ("Briefly, what is a rainbow?", "A rainbow is an arc of colors in the sky made when sunlight is bent and reflected by raindrops."),
]


def instruction_prompts(root):
    """Prompts of the instruction set the pipelines train and evaluate on: never repeated here."""
    seen = set()
    for f in sorted((root / "data" / "instructions").glob("*.jsonl")):
        seen.update(json.loads(line)["prompt"].strip().lower() for line in open(f))
    return seen


def main():
    root = pathlib.Path(__file__).resolve().parent.parent
    rows = []
    for country, city in CAPITALS:
        rows.append({"category": "geography", "prompt": f"What is the capital of {country}?{SHORT}", "answers": ALIASES.get(city, [city])})
    for q, n in ARITHMETIC:
        rows.append({"category": "arithmetic", "prompt": q + SHORT, "answers": number_answers(n)})
    for cat, items in FACTS.items():
        for q, answers in items:
            rows.append({"category": cat, "prompt": q + SHORT, "answers": answers})
    for q, ref in LONG:
        rows.append({"category": "explanations", "prompt": q, "reference": ref})
    # A prompt the instruction set already holds could have been trained on: left out.
    known = instruction_prompts(root)
    kept = [r for r in rows if r["prompt"].removesuffix(SHORT).strip().lower() not in known]
    print(f"{len(rows) - len(kept)} prompts left out: the instruction set has them")
    rows = kept
    out = root / "data" / "targeted" / "targeted.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"id": f"t{i:03d}", **r}, ensure_ascii=False) + "\n")
    print(f"{out}: {len(rows)} records")


if __name__ == "__main__":
    main()
