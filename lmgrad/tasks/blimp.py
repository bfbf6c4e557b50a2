"""BLiMP (Warstadt et al. 2020): 67 paradigms of 1,000 minimal pairs, read from a directory.

The data is not shipped with lmgrad (see ``DATA.md``). `blimp_source_dir` finds it, first
match wins:

1. a directory passed as ``blimp_dir=`` (to `load_blimp`, `blimp_taxonomy`, `select_tasks`);
2. one set with `set_blimp_dir`;
3. ``$LMGRAD_BLIMP_DIR``;
4. the cache ``$LMGRAD_CACHE/blimp`` (default ``~/.cache/lmgrad/blimp``), each paradigm
   downloaded on first use from the authors' repository at `BLIMP_COMMIT`
   (``<BLIMP_BASE_URL>/<UID>.jsonl``), checked against its pinned sha256, written atomically.

A directory holds ``<UID>.jsonl`` or ``<UID>.jsonl.gz`` per paradigm, e.g. the ``data/``
folder of a clone of github.com/alexwarstadt/blimp. Files are read as published: the
``syntax/semantics`` spelling of one paradigm is normalised when parsed (`normalise_field`),
and ``Task.sha256`` is the hash of the uncompressed file bytes.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import http.client
import json
import os
import pathlib
import urllib.request
from typing import Iterable

from lmgrad.io import atomic_write
from lmgrad.models.fetch import cache_dir
from lmgrad.tasks.pairs import Task, TaskDataError, normalise_field, parse_jsonl

__all__ = [
    "BLIMP_SOURCE", "BLIMP_COMMIT", "BLIMP_BASE_URL", "BLIMP_DIR_ENV_VAR", "BLIMP_UIDS",
    "blimp_uids", "load_blimp", "blimp_taxonomy", "set_blimp_dir", "blimp_source_dir", "blimp_path",
]

BLIMP_SOURCE = "blimp"
BLIMP_COMMIT = "3e56b06fcabca9b30822fc66435fca6b1aa40bb1"  # github.com/alexwarstadt/blimp
BLIMP_BASE_URL = f"https://raw.githubusercontent.com/alexwarstadt/blimp/{BLIMP_COMMIT}/data"
BLIMP_DIR_ENV_VAR = "LMGRAD_BLIMP_DIR"
_DOWNLOAD_TIMEOUT_S = 60

# sha256 of each paradigm's file at BLIMP_COMMIT, as published (uncompressed). Checked on
# download only: a user's directory may hold another BLiMP version, and Task.sha256 records it.
BLIMP_SHA256: dict[str, str] = {
    "adjunct_island": "ecc71c452516de03deeb9262b4203e45220dc52727327a08eef07c79c01eac8b",
    "anaphor_gender_agreement": "fd7d6e47196fa1310a251d3aa88ae9a62bb64d3cec35fc02617229d5799767e1",
    "anaphor_number_agreement": "05c16b8bfe4feb5b3552dc2c53d1742ce0c91d9a1c896684335bdddd4373cc9b",
    "animate_subject_passive": "245e91961cf597150244c3945c6d0033e691b27ba6cf298c62920d355426e70c",
    "animate_subject_trans": "a7bffeda200f648c33dd215d91d8f5756fcd1e3f410bab467f1ed9235f215850",
    "causative": "2e1006cc24094a3049586888105b22181d77e09e11dea65a326b49977bb366f1",
    "complex_NP_island": "1c92472731dd9a21eb222d64bee756042a3763c3797b5283d5b84ab8e3cbb74c",
    "coordinate_structure_constraint_complex_left_branch": "47e0e04efeb320449a8eb2ac722b895041a8609580fec2880dbc719f50fba194",
    "coordinate_structure_constraint_object_extraction": "d01c27a7a893f3ec071a7913efa504d297671d86a987f26ddb565de914db2fd7",
    "determiner_noun_agreement_1": "f48065fd760d0fd1a895012860d38bdf3c2ac115cd221e521684cc430c0f1855",
    "determiner_noun_agreement_2": "8ae7eff7c7bd384ff5ef3113984834f4d78b34559203aa9d5cb14ea8394291a9",
    "determiner_noun_agreement_irregular_1": "4f350e88db9e29e53ae96f1f0b5991c7809fd4fd403190907330b721e1e6e264",
    "determiner_noun_agreement_irregular_2": "d688af0ccd0614d24a936e0929276784f37554f3ad3e247c3bade8dcaa9099df",
    "determiner_noun_agreement_with_adj_2": "8d2828d7dfbfc3f7191024514060fedb033ea2e232304f63448c33051a85d2b3",
    "determiner_noun_agreement_with_adj_irregular_1": "1f4c6e42a48f4220afec629679641479feac3883cd7fa346d9e9e129cd7e8f55",
    "determiner_noun_agreement_with_adj_irregular_2": "aa3f297a7ce0c03b5fc00458834f89e54eb855973be098497f766a390b4bc669",
    "determiner_noun_agreement_with_adjective_1": "2c3de4e7b7aea499fb7cf1b23b9c3b63662289880f991b9ffabe5ceb94cf7430",
    "distractor_agreement_relational_noun": "37c1553f4c6594b162256edce0f6b40bad1898b311c8aaa69605b526b6494a34",
    "distractor_agreement_relative_clause": "854728b6db8f23f12583f7332b654835351eaedb50783e6f2a3bf6c101b8c422",
    "drop_argument": "e262339a262a57a8f56dc41941ee1dc32c62eb97054b27d33cd8c356a6e62064",
    "ellipsis_n_bar_1": "3cc0bcf91631a4476ce573ea9dbf9627d52efbe071c26019e2c2448b68769d09",
    "ellipsis_n_bar_2": "3dfc2b378ea4867186917ec9cce5ce927e4d3bb6addf018bc31b870dd2aa8474",
    "existential_there_object_raising": "3781bfd54ec1208fc634f4d365189f948ec246526a7345b5148dd3ab6023ff4f",
    "existential_there_quantifiers_1": "4bd0f6dee3c1824b51b0dafb9fce2b00933e8053fcd4a7b99b6202e1b8b49f9e",
    "existential_there_quantifiers_2": "b1a80f4ebebae90a90927259f95b680059020e6bb4e38e64a41eb8e53bc3f617",
    "existential_there_subject_raising": "7c6f5b13225f73a777755c1948beef5cfa31d135ae8a0e7ba8853d256fbece23",
    "expletive_it_object_raising": "15ed3a52c978ecfe5eda7f64b0304b5bd133439cccb2c97fde20834f39874c93",
    "inchoative": "d9389a7130ca84c6f920c9d892cc60c1b20f378d28e7041b1c53ae589fc84f1d",
    "intransitive": "9af9f3f30c891cd21623922b62fd97685552b4ae94a6cfd5617a5f0cb0f731b3",
    "irregular_past_participle_adjectives": "5e490be0723989499391ac14d11b3bb6677f4b470514486b2db3fbfe76d56b3c",
    "irregular_past_participle_verbs": "75a990117c1a403d3b479e0fbe170f6919c2408def738ffcea8c62b49b70a555",
    "irregular_plural_subject_verb_agreement_1": "0066174143671bffa54232d89254d14221afab666273edfefdfb625fbb75e226",
    "irregular_plural_subject_verb_agreement_2": "9b22db814e7b7251f4abafe8beb9616f2f46eaa58f7cdb701cbc737cc8f1a124",
    "left_branch_island_echo_question": "7dadbe3c5a5ceadb78b9408807ac88230ddd748abfe8de8121f064e2bce94ad8",
    "left_branch_island_simple_question": "e2a64b8a1b7b8d94f931018cf9325836e9c79953a01379233da255eac5e8cd71",
    "matrix_question_npi_licensor_present": "657c9d6e6d50a9cd651881fcbc57cef2fd998611f6f53158ed05e48822fcd2b5",
    "npi_present_1": "9aa85dc5c2b0d85ea51f21db50d6d327ab5b45d1669e386d54b1360d3ac954af",
    "npi_present_2": "52fcfa230a40ae27998273cc08ecd062aad17025c92389df3404a85ed519909b",
    "only_npi_licensor_present": "475c6595187a32e4dcfb868d3db90394e89669a94a9312ebd60f88dad1665f1c",
    "only_npi_scope": "ca1f0671643e37936515f02125036bc2904ab9b35c4689b0e7a3ea3914e571f6",
    "passive_1": "e9374307bca5c24e9df18597a0859f7fb5ca4cfe5f136ec894d1ba69f4c90116",
    "passive_2": "4d49e438185bed4122a252dd9ee69bc8eccb2fe6c1b09ccc78198fd925fed8c5",
    "principle_A_c_command": "74c8111666542c797dee1c38c9e432b0b65751dfa0faa51874a990f2cbfc76fc",
    "principle_A_case_1": "7efb5246fe315dc2cf56b80739783cffcddee9e52650716cf5aa0f6987f7644d",
    "principle_A_case_2": "5de6db4c21a8433bc1f1030e81d5ee151efce02078460f7de7ca5e9566afd914",
    "principle_A_domain_1": "2276dc35a51396c7d11a401e378e0f4b31cd10d7916c73e9a361703cb96eddc5",
    "principle_A_domain_2": "9d14e5ae911fb8ddf571484ef2d6a6e6a053765c1c6d34253aec2c11f7d7306a",
    "principle_A_domain_3": "a0d66b9d8541ab1df08f629161c6c4e8bca3aa2693eaa342edd2097e6b579bdd",
    "principle_A_reconstruction": "65dc403c4d6e9a609f2c4cc2ec6c8baa05cf6fce89b920a816b0d9932204b2a3",
    "regular_plural_subject_verb_agreement_1": "1a18d94062c8e792c0a200a3b00dff0e051a92bb084c05e9b5e5c73bee32a620",
    "regular_plural_subject_verb_agreement_2": "e5b4668811e63b00ac4c9569cb9553281a39c21df43256905ad78e59ae24942c",
    "sentential_negation_npi_licensor_present": "c43405aca13ba4aa6ad87f9b051e4ba5fc458f24e683cfe0af23e6e09ec7268b",
    "sentential_negation_npi_scope": "6c341ccc39c94bea45c0412986751bf2f6eca48626728e30e23d2b6a22c8b949",
    "sentential_subject_island": "a286b67cc5912aafeb06750b38923abf3338786ffa4309e0a6a07b1dbe2444bd",
    "superlative_quantifiers_1": "bebc5c5ff28cf226cc35293c60cde1fcf7565a7b58cb219d01ac8908b952a497",
    "superlative_quantifiers_2": "4bef08f3e6bd3fbb46021dda34000f3c00222c5576babe4882a8541f6820a106",
    "tough_vs_raising_1": "8eb3a1ecbdbd969c5b77e2f85b12a39d33723bdc58d673e5067bb456da91d0e5",
    "tough_vs_raising_2": "a6db2f24a8aee0c90a9be63e6bb6787fe04e990c518761115f69f27c7438b5ae",
    "transitive": "48de2025571897c7590659c793d2d1ce85c247808d4199bad60f66cf2eb179ef",
    "wh_island": "77824ca8c0008fb7a204e785ca2dcee1b2803f666bb545bd95cb8a51e04f1a4c",
    "wh_questions_object_gap": "685c74eb8c199f30a24bba1bfabf9d9dff7962a64430e62b9b5f61d5369241ff",
    "wh_questions_subject_gap": "3c33e4efc7182824211ff3288694cf010f4ce84f85c8df67410d784139c722b3",
    "wh_questions_subject_gap_long_distance": "985bae202dbc5566b9b5c51bd77dd9d1dbcd87e0f38e008c34a11d7aa07db788",
    "wh_vs_that_no_gap": "6a25d0d1499e9f522696a62ce9dba8c49f58c5446fddc6d852bf562d1016163c",
    "wh_vs_that_no_gap_long_distance": "968faf59602a67f9cfd7c2e91a314a3f7342fd5daf41c21cadd25288fc85fdcf",
    "wh_vs_that_with_gap": "56f1ca988a8ca368234f12359792c414fdfec2891154e3f8ce6404da1d3f3212",
    "wh_vs_that_with_gap_long_distance": "3cb19100d6384264e512801e96c20e172a3c0c7778276b80ed60c65e97b86ab5",
}
BLIMP_UIDS: tuple[str, ...] = tuple(sorted(BLIMP_SHA256))

_explicit_dir: pathlib.Path | None = None


def set_blimp_dir(path: str | os.PathLike | None) -> None:
    """Read BLiMP from `path` from now on (what a ``--blimp_dir`` flag calls); None undoes it.

    Takes precedence over ``$LMGRAD_BLIMP_DIR`` and the cache; a ``blimp_dir=`` argument
    still wins over it. The directory is checked when first used, not here.
    """
    global _explicit_dir
    _explicit_dir = None if path is None else pathlib.Path(path).expanduser()


def blimp_source_dir(blimp_dir: str | os.PathLike | None = None) -> tuple[pathlib.Path, str]:
    """The directory BLiMP is read from and where that came from, without downloading.

    Returns:
      ``(directory, origin)``; origin is ``"blimp_dir argument"``, ``"set_blimp_dir"``,
      ``"$LMGRAD_BLIMP_DIR"`` or ``"cache"``. Only the cache may lack paradigms (they are
      downloaded on use); any other directory must hold all 67.

    Raises:
      TaskDataError: a given directory that does not exist, or lacks paradigms (naming them).
    """
    if blimp_dir is not None:
        found = pathlib.Path(blimp_dir).expanduser(), "blimp_dir argument"
    elif _explicit_dir is not None:
        found = _explicit_dir, "set_blimp_dir"
    elif os.environ.get(BLIMP_DIR_ENV_VAR):
        found = pathlib.Path(os.environ[BLIMP_DIR_ENV_VAR]).expanduser(), f"${BLIMP_DIR_ENV_VAR}"
    else:
        return cache_dir() / "blimp", "cache"
    _check_dir(*found)
    return found


def blimp_path(uid: str, *, blimp_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The file of paradigm `uid` (``.jsonl`` or ``.jsonl.gz``), downloaded into the cache
    first when no directory is configured and the cache lacks it.

    Raises:
      TaskDataError: an unknown UID; a configured directory that is missing or incomplete;
        a failed download (naming the URL and both ways to provide the data).
    """
    if uid not in BLIMP_SHA256:
        raise TaskDataError(f"unknown BLiMP UID {uid!r}; valid UIDs: {', '.join(BLIMP_UIDS)}")
    return _locate(blimp_source_dir(blimp_dir), uid)


def _locate(source: tuple[pathlib.Path, str], uid: str) -> pathlib.Path:
    directory, origin = source
    found = _find(directory, uid)
    if found is not None:
        return found
    assert origin == "cache", origin  # _check_dir guarantees every paradigm elsewhere
    target = directory / f"{uid}.jsonl"
    _download(uid, target)
    return target


def blimp_uids() -> list[str]:
    """The 67 BLiMP paradigm UIDs, sorted (known without the data)."""
    return list(BLIMP_UIDS)


def load_blimp(uids: Iterable[str] | None = None, *, blimp_dir: str | os.PathLike | None = None) -> list[Task]:
    """Load BLiMP paradigms (all 67 when `uids` is None), sorted by UID.

    Each Task has ``source="blimp"`` and ``sha256`` of its paradigm's uncompressed JSONL.
    Results are cached per file; Tasks are immutable. See the module docstring for where
    the files come from.

    Raises:
      TaskDataError: for a UID that is not a BLiMP paradigm (the message lists them), or
        data that cannot be found or fetched (see `blimp_path`).
    """
    wanted = BLIMP_UIDS if uids is None else sorted(set(uids))
    unknown = [u for u in wanted if u not in BLIMP_SHA256]
    if unknown:
        raise TaskDataError(f"unknown BLiMP UID(s) {unknown}; valid UIDs: {', '.join(BLIMP_UIDS)}")
    source = blimp_source_dir(blimp_dir)
    return [_load_file(str(_locate(source, u)), u) for u in wanted]


def blimp_taxonomy(*, blimp_dir: str | os.PathLike | None = None) -> dict[str, dict[str, str | None]]:
    """``{uid: {"field": ..., "linguistics_term": ...}}`` for all 67 paradigms."""
    source = blimp_source_dir(blimp_dir)
    paths = tuple(str(_locate(source, u)) for u in BLIMP_UIDS)
    return {uid: {"field": f, "linguistics_term": t} for uid, f, t in _taxonomy(paths)}


@functools.lru_cache(maxsize=None)
def _load_file(path: str, uid: str) -> Task:
    data = _read(pathlib.Path(path), whole=True)
    tasks = parse_jsonl(data, name=path, default_uid=uid, source=BLIMP_SOURCE)
    if [t.uid for t in tasks] != [uid]:
        raise TaskDataError(
            f"{path}: field 'UID': holds UID(s) {[t.uid for t in tasks]}, expected only {uid!r} "
            "(the file name)")
    return tasks[0]


@functools.lru_cache(maxsize=None)
def _taxonomy(paths: tuple[str, ...]) -> tuple[tuple[str, str | None, str | None], ...]:
    # Every paradigm has one field and one term (parse_jsonl enforces it), so the first
    # line suffices; this keeps `select_tasks("term:...")` from parsing all 67,000 pairs.
    out = []
    for uid, path in zip(BLIMP_UIDS, paths):
        line = _read(pathlib.Path(path), whole=False)
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{path}:1: malformed JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(obj, dict):
            raise TaskDataError(f"{path}:1: expected a JSON object, got {type(obj).__name__}")
        out.append((uid, normalise_field(obj.get("field")), obj.get("linguistics_term")))
    return tuple(out)


def _read(path: pathlib.Path, *, whole: bool) -> bytes:
    """The uncompressed bytes of `path` (all of them, or the first line)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            return fh.read() if whole else fh.readline()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise TaskDataError(f"{path}: cannot read BLiMP file: {e}") from e


def _find(directory: pathlib.Path, uid: str) -> pathlib.Path | None:
    for suffix in (".jsonl", ".jsonl.gz"):
        p = directory / (uid + suffix)
        if p.is_file():
            return p
    return None


def _check_dir(directory: pathlib.Path, origin: str) -> None:
    if not directory.is_dir():
        raise TaskDataError(
            f"BLiMP directory {directory} (from {origin}) does not exist or is not a directory; "
            f"{_HOW_TO}")
    missing = [u for u in BLIMP_UIDS if _find(directory, u) is None]
    if missing:
        # A common slip: the clone's root instead of its data/ folder.
        hint = f"; did you mean {directory / 'data'}?" if _find(directory / "data", missing[0]) else ""
        raise TaskDataError(
            f"BLiMP directory {directory} (from {origin}) lacks {len(missing)} of the 67 paradigms: "
            f"{', '.join(missing)} (expected <UID>.jsonl or <UID>.jsonl.gz for each){hint}; {_HOW_TO}")


_HOW_TO = (
    f"either set {BLIMP_DIR_ENV_VAR} (or pass --blimp_dir to a launcher, inputs.blimp_dir in a config, blimp_dir= in Python) "
    "to a directory holding the 67 <UID>.jsonl files, e.g. the data/ "
    "folder of a clone of https://github.com/alexwarstadt/blimp, or leave it unset and allow "
    f"lmgrad to download them into its cache from {BLIMP_BASE_URL}/<UID>.jsonl"
)


def _download(uid: str, target: pathlib.Path) -> None:
    """Fetch one paradigm into `target` atomically, checking its pinned sha256."""
    # Read the module attribute at call time so tests can point it at a file:// stand-in.
    url = f"{BLIMP_BASE_URL}/{uid}.jsonl"
    try:
        with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as resp:
            data = resp.read()
    # URLError, HTTPError and timeouts are OSErrors; ValueError: a malformed URL;
    # HTTPException: a connection cut mid-body (IncompleteRead).
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise TaskDataError(
            f"BLiMP paradigm {uid!r} is not in the cache {target.parent} and downloading {url} "
            f"failed ({e}); {_HOW_TO}") from e
    got = hashlib.sha256(data).hexdigest()
    if got != BLIMP_SHA256[uid]:
        raise TaskDataError(
            f"{url}: sha256 {got}, expected {BLIMP_SHA256[uid]} (BLiMP at commit {BLIMP_COMMIT}); "
            f"not cached. {_HOW_TO[0].upper()}{_HOW_TO[1:]}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, data)
    except OSError as e:
        raise TaskDataError(f"{target}: cannot write the downloaded BLiMP paradigm ({e}); {_HOW_TO}") from e
