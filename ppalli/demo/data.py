"""The built-in demo data: short Korean and English question/answer pairs, written by the project.

Rows are composed from a few templates and small fact lists, so the file is the same on every machine
and every run (no download, no randomness beyond a fixed-seed shuffle). The format is alpaca:
``instruction``, ``input`` (empty), ``output``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DEMO_FILE = "demo.jsonl"

# (Korean name, English name, Korean capital, English capital)
_CAPITALS = [
    ("한국", "South Korea", "서울", "Seoul"),
    ("일본", "Japan", "도쿄", "Tokyo"),
    ("중국", "China", "베이징", "Beijing"),
    ("프랑스", "France", "파리", "Paris"),
    ("영국", "the United Kingdom", "런던", "London"),
    ("독일", "Germany", "베를린", "Berlin"),
    ("이탈리아", "Italy", "로마", "Rome"),
    ("스페인", "Spain", "마드리드", "Madrid"),
    ("캐나다", "Canada", "오타와", "Ottawa"),
    ("호주", "Australia", "캔버라", "Canberra"),
    ("러시아", "Russia", "모스크바", "Moscow"),
    ("이집트", "Egypt", "카이로", "Cairo"),
    ("인도", "India", "뉴델리", "New Delhi"),
    ("태국", "Thailand", "방콕", "Bangkok"),
    ("베트남", "Vietnam", "하노이", "Hanoi"),
    ("몽골", "Mongolia", "울란바토르", "Ulaanbaatar"),
    ("그리스", "Greece", "아테네", "Athens"),
    ("포르투갈", "Portugal", "리스본", "Lisbon"),
]

# (Korean thing, Korean colour, English thing, English colour)
_COLOURS = [
    ("하늘", "파란색", "the sky", "blue"),
    ("바나나", "노란색", "a banana", "yellow"),
    ("눈", "하얀색", "snow", "white"),
    ("풀", "초록색", "grass", "green"),
    ("딸기", "빨간색", "a strawberry", "red"),
    ("석탄", "검은색", "coal", "black"),
    ("당근", "주황색", "a carrot", "orange"),
    ("포도", "보라색", "a grape", "purple"),
    ("우유", "하얀색", "milk", "white"),
    ("토마토", "빨간색", "a tomato", "red"),
]

# (Korean word, English meaning)
_WORDS = [
    ("사과", "apple"), ("물", "water"), ("책", "book"), ("학교", "school"), ("친구", "friend"),
    ("고양이", "cat"), ("강아지", "puppy"), ("바다", "sea"), ("산", "mountain"), ("음악", "music"),
    ("사랑", "love"), ("시간", "time"), ("집", "house"), ("꽃", "flower"), ("달", "moon"),
]

_DAYS = [("월요일", "Monday"), ("화요일", "Tuesday"), ("수요일", "Wednesday"), ("목요일", "Thursday"),
         ("금요일", "Friday"), ("토요일", "Saturday"), ("일요일", "Sunday")]

_CHAT_KO = [
    ("안녕하세요!", "안녕하세요! 무엇을 도와드릴까요?"),
    ("오늘 기분이 어때요?", "저는 언제나 좋아요. 당신의 하루는 어떤가요?"),
    ("이름이 뭐예요?", "저는 빨리라는 작은 도우미입니다."),
    ("고마워요.", "천만에요. 언제든지 물어보세요."),
    ("잘 자요.", "안녕히 주무세요. 좋은 꿈 꾸세요!"),
    ("배고파요.", "맛있는 밥을 드시는 건 어떨까요?"),
    ("심심해요.", "산책을 하거나 좋아하는 음악을 들어 보세요."),
    ("한국어를 할 수 있나요?", "네, 한국어와 영어로 대답할 수 있어요."),
    ("좋은 아침이에요.", "좋은 아침입니다! 오늘도 힘내세요."),
    ("날씨가 추워요.", "따뜻하게 입고 감기 조심하세요."),
]

_CHAT_EN = [
    ("Hello!", "Hello! How can I help you today?"),
    ("How are you?", "I am doing well, thank you. How is your day going?"),
    ("What is your name?", "I am Ppalli, a small helper."),
    ("Thank you.", "You are welcome. Ask me anything."),
    ("Good night.", "Good night. Sleep well!"),
    ("I am hungry.", "How about a warm and tasty meal?"),
    ("I am bored.", "You could take a walk or listen to your favourite music."),
    ("Can you speak English?", "Yes, I can answer in English and Korean."),
    ("Good morning.", "Good morning! Have a great day."),
    ("It is cold today.", "Dress warmly and take care not to catch a cold."),
]


def _has_batchim(word: str) -> bool:
    """True when the last Hangul syllable ends in a consonant; picks 은/는 and 이/가 like a native writer."""
    code = ord(word[-1]) - 0xAC00
    return 0 <= code < 11172 and code % 28 != 0


def _topic(word: str) -> str:
    return word + ("은" if _has_batchim(word) else "는")


def _capital_rows() -> list[tuple[str, str]]:
    rows = []
    for ko, en, ko_cap, en_cap in _CAPITALS:
        rows.append((f"{ko}의 수도는 어디인가요?", f"{ko}의 수도는 {ko_cap}입니다."))
        rows.append((f"What is the capital of {en}?", f"The capital of {en} is {en_cap}."))
    return rows


def _arithmetic_rows() -> list[tuple[str, str]]:
    rows = []
    for i in range(12):
        a, b = (7 * i + 3) % 20 + 1, (5 * i + 8) % 15 + 2  # a fixed spread of small sums
        rows.append((f"{a} 더하기 {b}의 답은 무엇인가요?", f"{a} 더하기 {b}의 답은 {a + b}입니다."))
        rows.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
    return rows


def _colour_rows() -> list[tuple[str, str]]:
    rows = []
    for ko, ko_col, en, en_col in _COLOURS:
        rows.append((f"{_topic(ko)} 무슨 색인가요?", f"{_topic(ko)} 보통 {ko_col}입니다."))
        rows.append((f"What colour is {en}?", f"{en[0].upper() + en[1:]} is usually {en_col}."))
    return rows


def _word_rows() -> list[tuple[str, str]]:
    rows = []
    for ko, en in _WORDS:
        rows.append((f"영어 단어 '{en}'의 뜻은 무엇인가요?", f"'{en}'의 뜻은 '{ko}'입니다."))
        rows.append((f"What does the Korean word '{ko}' mean?", f"'{ko}' means '{en}' in English."))
    return rows


def _day_rows() -> list[tuple[str, str]]:
    rows = []
    for i, (ko, en) in enumerate(_DAYS):
        ko_next, en_next = _DAYS[(i + 1) % len(_DAYS)]
        rows.append((f"{ko} 다음은 무슨 요일인가요?", f"{ko} 다음은 {ko_next}입니다."))
        rows.append((f"What day comes after {en}?", f"{en_next} comes after {en}."))
    return rows


def demo_pairs() -> list[tuple[str, str]]:
    """All (question, answer) pairs, Korean and English mixed in a fixed order."""
    pairs = _capital_rows() + _arithmetic_rows() + _colour_rows() + _word_rows() + _day_rows()
    pairs += _CHAT_KO + _CHAT_EN
    random.Random(0).shuffle(pairs)  # mixes topics so any split of the file sees every kind of row
    return pairs


def write_demo_data(dir: str | Path) -> Path:
    """Write the demo pairs as alpaca JSONL into `dir` and return the file path (same bytes every time)."""
    path = Path(dir) / DEMO_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"instruction": q, "input": "", "output": a}, ensure_ascii=False) for q, a in demo_pairs()]
    text = "\n".join(lines) + "\n"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path
