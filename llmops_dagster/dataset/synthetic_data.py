"""A deterministic synthetic instruction set: customer support for the Aurora smart-home line.

Every answer follows from its prompt (the order number, product and intent in the question decide
the reply), so a fine-tune can measurably learn the mapping. The same seed always gives the same
rows in the same order. The set carries no personal data: order numbers are five digits and never
look like phone or card numbers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PRODUCTS = (
    "Aurora Thermostat",
    "Aurora Doorbell",
    "Aurora Camera",
    "Aurora Speaker",
    "Aurora Smart Lock",
    "Aurora Light Strip",
    "Aurora Hub",
    "Aurora Air Sensor",
)

# Deterministic facts the answers are derived from; a model must learn them per product.
WARRANTY_YEARS = {product: 1 + index % 3 for index, product in enumerate(PRODUCTS)}
RESET_SECONDS = {product: 5 + 5 * (index % 4) for index, product in enumerate(PRODUCTS)}
CARRIERS = ("standard", "express", "overnight")
SHIPPING_COST = {"standard": "free", "express": "$9.99", "overnight": "$24.99"}
# Greetings and sign-offs vary how people write without changing what they ask.
GREETINGS = ("", "Hi, ", "Hello! ", "Good morning. ", "Hey team, ", "Quick question: ")
SIGN_OFFS = ("", " Thanks!", " Thank you.", " Cheers.")
CITIES = ("Lyon", "Austin", "Osaka", "Leeds", "Porto", "Denver", "Turin", "Ghent", "Perth", "Quebec")


@dataclass(frozen=True)
class Intent:
    """One support intent: how customers ask, and how the answer is built from what they asked."""

    name: str
    questions: tuple[str, ...]
    answer: str


INTENTS: tuple[Intent, ...] = (
    Intent(
        "order_status",
        (
            "Where is my order {order}?",
            "Can you tell me the status of order {order}?",
            "Has order {order} for the {product} shipped yet?",
            "I ordered a {product}, order number {order}. When will it arrive?",
        ),
        "Order {order} left our warehouse and is on its way. You can follow it on the Orders "
        "page; most parcels arrive within 3 business days.",
    ),
    Intent(
        "return_request",
        (
            "I want to return my {product}, order {order}.",
            "How do I send back the {product} from order {order}?",
            "Can I get a refund for the {product} I bought in order {order}?",
        ),
        "I have opened a return for the {product} in order {order}. Print the prepaid label "
        "from the Orders page; your refund is issued 5 days after we receive it.",
    ),
    Intent(
        "reset_device",
        (
            "How do I factory reset my {product}?",
            "My {product} is frozen, how can I reset it?",
            "What is the reset procedure for the {product}?",
        ),
        "Hold the button on the back of the {product} for {reset_seconds} seconds until the "
        "light blinks white, then set it up again in the Aurora app.",
    ),
    Intent(
        "warranty_check",
        (
            "How long is the warranty on the {product}?",
            "Is my {product} still under warranty? It is from order {order}.",
            "What warranty comes with the {product}?",
        ),
        "The {product} has a {warranty_years}-year limited warranty from the delivery date.",
    ),
    Intent(
        "shipping_cost",
        (
            "How much does {carrier} shipping cost for a {product}?",
            "What do you charge for {carrier} delivery of the {product}?",
            "Is {carrier} shipping free if I buy a {product}?",
        ),
        "{carrier_title} shipping for the {product} costs {shipping_cost}.",
    ),
    Intent(
        "cancel_order",
        (
            "Please cancel order {order}.",
            "I changed my mind about the {product}, cancel order {order}.",
            "Can I still cancel order {order} for the {product}?",
        ),
        "Order {order} is cancelled. The payment hold is released within 3 business days.",
    ),
    Intent(
        "device_setup",
        (
            "How do I set up my new {product}?",
            "I just unboxed the {product}. What are the setup steps?",
            "How can I connect the {product} to my wifi?",
        ),
        "Open the Aurora app, tap Add device, choose {product} and follow the steps. Keep the "
        "{product} within 3 meters of your router during setup.",
    ),
    Intent(
        "change_address",
        (
            "Can you ship order {order} to {city} instead?",
            "I moved to {city}. Please update the delivery address for order {order}.",
            "Change the shipping city of order {order} to {city}, please.",
        ),
        "The delivery address of order {order} now points to {city}. You will get a new "
        "tracking e-mail when it ships.",
    ),
    Intent(
        "firmware_update",
        (
            "Is there a firmware update for the {product}?",
            "How do I update the software on my {product}?",
            "My {product} says its firmware is out of date. What should I do?",
        ),
        "The {product} updates itself overnight. To update now, open the Aurora app, select "
        "the {product} and tap Check for updates.",
    ),
    Intent(
        "billing_question",
        (
            "Why was I charged twice for order {order}?",
            "I see two payments for the {product} in order {order}.",
            "There is a duplicate charge on order {order}, can you fix it?",
        ),
        "The second charge on order {order} is a temporary authorization. It disappears "
        "within 3 business days; no action is needed.",
    ),
)


# Rows an intent gets per row of the others. A city is copied into the answer in one slice only,
# while order numbers and products are copied in seven: with equal shares the default model named
# the right city for 0.37 of fresh change-of-address questions, with twice the rows 1.00
# (benchmarks/bench_quality.py).
INTENT_WEIGHTS = {"change_address": 2}


def intent_schedule(weights: dict[str, int]) -> list[Intent]:
    """The order in which rows are given intents, repeated: each intent once, then the weighted
    ones again until each has its weight (an even spread, so any prefix of the set is balanced)."""
    schedule = list(INTENTS)
    for extra in range(1, max(weights.values(), default=1)):
        schedule += [intent for intent in INTENTS if weights.get(intent.name, 1) > extra]
    return schedule


def _fill(template: str, fields: dict[str, str]) -> str:
    return template.format(**fields)


def _fields(order: str, product: str, carrier: str, city: str) -> dict[str, str]:
    """Every value an answer template may use, derived from what the customer asked."""
    return {
        "order": order,
        "product": product,
        "carrier": carrier,
        "carrier_title": carrier.capitalize(),
        "shipping_cost": SHIPPING_COST[carrier],
        "city": city,
        "warranty_years": str(WARRANTY_YEARS[product]),
        "reset_seconds": str(RESET_SECONDS[product]),
    }


def reference_answer(intent: str, order: str = "A10000", product: str = PRODUCTS[0],
                     carrier: str = CARRIERS[0], city: str = CITIES[0]) -> str:
    """The answer the synthetic set gives to a question of `intent` about these values."""
    by_name = {i.name: i for i in INTENTS}
    if intent not in by_name:
        raise ValueError(f"unknown intent {intent!r}; one of {sorted(by_name)}")
    return _fill(by_name[intent].answer, _fields(order, product, carrier, city))


def generate_examples(n_rows: int = 2400, seed: int = 7, exclude: frozenset[str] = frozenset(),
                      weights: dict[str, int] | None = None) -> list[dict[str, str]]:
    """Return `n_rows` unique support examples with columns prompt, response, intent, product,
    spread over intents by `weights` (default INTENT_WEIGHTS; {} for equal shares); none of them
    has a prompt in `exclude` (fresh questions: another seed, the training prompts excluded)."""
    if n_rows < len(INTENTS):
        raise ValueError(f"n_rows must be at least {len(INTENTS)} (one per intent), got {n_rows}")
    # Reproducible synthetic data, not secrets: a seeded PRNG is what is wanted (bandit B311).
    rng = random.Random(seed)  # nosec B311
    schedule = intent_schedule(INTENT_WEIGHTS if weights is None else weights)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    attempts = 0
    while len(rows) < n_rows:
        attempts += 1
        if attempts > 50 * n_rows:
            raise RuntimeError(f"could not draw {n_rows} unique examples; lower n_rows")
        intent = schedule[len(rows) % len(schedule)]
        product = rng.choice(PRODUCTS)
        carrier = rng.choice(CARRIERS)
        fields = _fields(f"A{rng.randint(10000, 99999)}", product, carrier, rng.choice(CITIES))
        question = _fill(rng.choice(intent.questions), fields)
        greeting = rng.choice(GREETINGS)
        if greeting.endswith(", ") and not question.startswith("I "):
            question = question[0].lower() + question[1:]
        prompt = f"{greeting}{question}{rng.choice(SIGN_OFFS)}"
        if prompt in seen or prompt in exclude:
            continue
        seen.add(prompt)
        rows.append(
            {
                "prompt": prompt,
                "response": _fill(intent.answer, fields),
                "intent": intent.name,
                "product": product,
            }
        )
    return rows


# Facts the default data never states, for tests and benchmarks of the loop (a correction must
# teach them): (question, correction, a close paraphrase: the question's key words in other words
# around them).
NEW_FACTS = [
    ("Do you ship to Iceland?", "Yes, we ship to Iceland by express only, in 6 business days.",
     "Hi, can you ship my order to Iceland?"),
    ("Is the Aurora Hub compatible with Zigbee?",
     "Yes, the Aurora Hub pairs with Zigbee 3.0 devices from the Aurora app.",
     "Does the Aurora Hub work with Zigbee?"),
    ("Can I pay with PayPal?", "Yes, PayPal is accepted at checkout for every order.",
     "Can I pay for my order with PayPal?"),
    ("Do you have a student discount?", "Students get 15% off with a verified school account.",
     "Is there a student discount?"),
    ("What are your support hours?", "Our support team answers every day from 8 am to 8 pm CET.",
     "What are the support hours?"),
    ("Does the Aurora Camera record at night?",
     "Yes, the Aurora Camera records in infrared night vision up to 10 meters.",
     "Does the Aurora Camera record video at night?"),
    ("Is there a mobile app for Android?", "Yes, the Aurora app is on Google Play for Android 10 and later.",
     "Is the Aurora app available for Android?"),
    ("Can I gift wrap my order?", "Gift wrapping costs $4 and you can add it on the cart page.",
     "Can you gift wrap my order, please?"),
    ("Does the Aurora Speaker support Spotify?",
     "Yes, the Aurora Speaker streams Spotify through Spotify Connect.",
     "Can the Aurora Speaker play Spotify?"),
    ("Where is your company based?", "Aurora Home is based in Lyon, France, with a warehouse in Austin.",
     "Where is the company based?"),
]
