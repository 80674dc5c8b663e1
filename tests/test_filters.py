"""Metadata filters, date order and paging: parsing, SQL resolution, and the top-k that must
come from the filtered set (not be a filtered top-k)."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os

import numpy as np
import pytest

from indexer.model.identity import ModelIdentity, l2_normalise
from indexer.store.catalog import ImageRecord
from indexer.store.library import Library
from retrieval.search.engine import SearchEngine
from retrieval.search.errors import QueryError
from retrieval.search.filters import (
    FilterArgs,
    ImageFilter,
    allowed_ids,
    build_filter,
    filter_sql,
    folder_pattern,
    parse_date,
    parse_formats,
    parse_size,
    with_frames,
)
from retrieval.search.options import SearchOptions
from tests.clirun import run
from tests.margins import assert_clear_order, threshold_between
from tests.records import store


def record(path: str, vector: np.ndarray, **fields) -> ImageRecord:
    digest = f"{abs(hash(path)):064x}"[:64]
    mtime = fields.pop("mtime", dt.datetime(2022, 1, 1))
    return ImageRecord(
        path=path,
        size=fields.pop("size", 1000),
        mtime_ns=int(mtime.timestamp() * 1e9),
        sha256=digest,
        vector=vector,
        width=fields.pop("width", 640),
        height=fields.pop("height", 480),
        format=fields.pop("format", "JPEG"),
        **fields,
    )


def vectors(n: int, seed: int = 0) -> np.ndarray:
    return l2_normalise(np.random.default_rng(seed).standard_normal((n, 512)))


@pytest.fixture
def library(tmp_path):
    with Library.open(tmp_path / "lib", create=True) as lib:
        lib.bind_model(ModelIdentity(weights="fake"))
        yield lib


@pytest.fixture
def engine(library, fake_encoder):
    return SearchEngine(library, fake_encoder)


# -- parsing ----------------------------------------------------------------------------------
def test_dates_mean_their_first_instant():
    assert parse_date("2021") == dt.datetime(2021, 1, 1)
    assert parse_date("2021-06") == dt.datetime(2021, 6, 1)
    assert parse_date("2021-06-30") == dt.datetime(2021, 6, 30)
    assert parse_date("2021-06-30T18:05") == dt.datetime(2021, 6, 30, 18, 5)
    with pytest.raises(QueryError, match="before 'last tuesday' is not a date") as bad:
        parse_date("last tuesday", "before")
    assert bad.value.setting == "before"
    with pytest.raises(QueryError, match="not earlier than"):
        build_filter(FilterArgs(after="2022", before="2021-12"))


def test_sizes_formats_and_folders():
    assert parse_size("1920x1080") == (1920, 1080)
    assert parse_size("1080 X 1920") == (1920, 1080)
    with pytest.raises(QueryError, match="WIDTHxHEIGHT"):
        parse_size("big")
    assert parse_formats(["jpg"]) == ("JPEG", "MPO")
    assert parse_formats(["png,heic", ".avif"]) == ("PNG", "HEIF", "AVIF")
    with pytest.raises(QueryError, match="format jpgg is not a format clipdex reads") as bad:
        parse_formats(["jpgg"])
    assert bad.value.setting == "format"
    assert folder_pattern("trips/2019", cwd="/base") == "/base/trips/2019"
    assert folder_pattern("*/2019*/") == "*/2019*"
    assert folder_pattern("~/Pictures") == os.path.expanduser("~/Pictures")


def test_empty_filter_restricts_nothing(library):
    assert allowed_ids(library.catalog, build_filter(FilterArgs())) is None


# -- each filter in SQL -----------------------------------------------------------------------
def _paths(library: Library, spec: ImageFilter) -> set[str]:
    ids = library.catalog.ids_where(*filter_sql(spec))
    return {row["path"] for row in library.catalog.get_images(ids).values()}


def test_date_filters_use_capture_time_then_mtime(library):
    v = vectors(4)
    store(
        library,
        [
            record("/p/exif.jpg", v[0], taken_at=dt.datetime(2019, 6, 1, 12, 0)),
            record("/p/mtime.jpg", v[1], mtime=dt.datetime(2020, 3, 1, 10, 0)),
            # EXIF wins over a later mtime (a copied file keeps its capture time):
            record(
                "/p/copied.jpg",
                v[2],
                taken_at=dt.datetime(2018, 1, 1),
                mtime=dt.datetime(2023, 1, 1),
            ),
            record("/p/new.jpg", v[3], mtime=dt.datetime(2024, 5, 5)),
        ],
    )
    between = build_filter(FilterArgs(after="2019", before="2021"))
    assert _paths(library, between) == {"/p/exif.jpg", "/p/mtime.jpg"}
    assert _paths(library, build_filter(FilterArgs(before="2019"))) == {"/p/copied.jpg"}
    assert _paths(library, build_filter(FilterArgs(after="2023"))) == {"/p/new.jpg"}
    # --after is inclusive, --before exclusive, to the second:
    assert "/p/exif.jpg" in _paths(library, build_filter(FilterArgs(after="2019-06-01T12:00")))
    assert "/p/exif.jpg" not in _paths(library, build_filter(FilterArgs(before="2019-06-01T12:00")))
    assert "/p/mtime.jpg" in _paths(library, build_filter(FilterArgs(after="2020-03-01T10:00")))


def test_folder_filters_literal_and_glob(library):
    v = vectors(5)
    store(
        library,
        [
            record("/photos/2019/trip/a.jpg", v[0]),
            record("/photos/2019-summer/b.jpg", v[1]),
            record("/photos/2020/c.jpg", v[2]),
            record("/other/2019/d.jpg", v[3]),
            record("/photos/[odd]/e.jpg", v[4]),
        ],
    )
    store(library, [record("/photos/o/f.jpg", v[0]), record("/photos/d/g.jpg", v[1])])
    assert _paths(library, ImageFilter(folders=("/photos/2019",))) == {"/photos/2019/trip/a.jpg"}
    assert _paths(library, ImageFilter(folders=("/photos/2019*",))) == {
        "/photos/2019/trip/a.jpg",
        "/photos/2019-summer/b.jpg",
    }
    assert _paths(library, ImageFilter(folders=("*/2019",))) == {
        "/photos/2019/trip/a.jpg",
        "/other/2019/d.jpg",
    }
    assert _paths(library, ImageFilter(folders=("/photos/2020", "/other"))) == {
        "/photos/2020/c.jpg",
        "/other/2019/d.jpg",
    }
    # Only * and ? are wildcards: brackets are the folder's own characters, not a class.
    assert _paths(library, ImageFilter(folders=("/photos/[odd]",))) == {"/photos/[odd]/e.jpg"}
    assert _paths(library, ImageFilter(folders=("/photos/[od*",))) == {"/photos/[odd]/e.jpg"}
    assert _paths(library, ImageFilter(folders=("/photos/[od]",))) == set()  # not o or d


def test_a_folder_named_with_brackets_or_wildcards_matches_itself(library, tmp_path):
    """`--in 'Trip [2019]'` is that folder; a name holding ? or * still matches itself."""
    v = vectors(5)
    trip = tmp_path / "Trip [2019]"
    odd = tmp_path / "what? *really*"
    store(
        library,
        [
            record(f"{trip}/a.jpg", v[0]),
            record(f"{tmp_path}/Trip 2/b.jpg", v[1]),
            record(f"{tmp_path}/Trip [2019] extra/c.jpg", v[2]),
            record(f"{odd}/d.jpg", v[3]),
        ],
    )
    for typed, cwd in ((str(trip), None), ("Trip [2019]", str(tmp_path))):
        spec = build_filter(FilterArgs(folders=(typed,)), cwd=cwd)
        assert _paths(library, spec) == {f"{trip}/a.jpg"}
    spec = build_filter(FilterArgs(folders=("Trip [2019]*",)), cwd=str(tmp_path))
    assert _paths(library, spec) == {f"{trip}/a.jpg", f"{tmp_path}/Trip [2019] extra/c.jpg"}
    assert _paths(library, ImageFilter(folders=(str(odd),))) == {f"{odd}/d.jpg"}


def test_camera_size_and_format_filters(library):
    v = vectors(5)
    store(
        library,
        [
            record(
                "/p/canon.jpg",
                v[0],
                camera_make="Canon",
                camera_model="Canon EOS 70D",
                width=4000,
                height=3000,
            ),
            record(
                "/p/iphone.heic",
                v[1],
                camera_make="Apple",
                camera_model="iPhone 12",
                width=3000,
                height=4000,
                format="HEIF",
            ),
            record(
                "/p/nikon.jpg",
                v[2],
                camera_make="NIKON CORPORATION",
                camera_model="D750",
                width=1920,
                height=1080,
                format="MPO",
            ),
            record("/p/scan.png", v[3], width=800, height=600, format="PNG"),
            record("/p/odd_100%.jpg", v[4], camera_make="Odd_100%", width=10, height=10),
        ],
    )
    assert _paths(library, build_filter(FilterArgs(camera="iphone"))) == {"/p/iphone.heic"}
    assert _paths(library, build_filter(FilterArgs(camera="eos 70"))) == {"/p/canon.jpg"}
    assert _paths(library, build_filter(FilterArgs(camera="nikon d750"))) == {"/p/nikon.jpg"}
    assert _paths(library, build_filter(FilterArgs(camera="100%"))) == {"/p/odd_100%.jpg"}
    assert _paths(library, build_filter(FilterArgs(camera="d7_0"))) == set()  # _ is no wildcard
    # Either orientation: a portrait 3000x4000 is "at least 3500x2500".
    assert _paths(library, build_filter(FilterArgs(min_size="3500x2500"))) == {
        "/p/canon.jpg",
        "/p/iphone.heic",
    }
    assert len(_paths(library, build_filter(FilterArgs(min_size="1080x1920")))) == 3
    assert _paths(library, build_filter(FilterArgs(formats=("jpg",)))) == {
        "/p/canon.jpg",
        "/p/nikon.jpg",
        "/p/odd_100%.jpg",
    }
    assert _paths(library, build_filter(FilterArgs(formats=("heic", "png")))) == {
        "/p/iphone.heic",
        "/p/scan.png",
    }


def test_tag_filter_needs_all_tags_any_case(library):
    v = vectors(3)
    ids = store(library, [record(f"/p/{n}.jpg", v[i]) for i, n in enumerate("abc")])
    with pytest.raises(QueryError, match="clipdex tag"):
        allowed_ids(library.catalog, build_filter(FilterArgs(tags=("cat",))))
    library.catalog.store_tags(
        "digest",
        {ids[0]: [("cat", 0.8), ("outdoor", 0.1)], ids[1]: [("cat", 0.5)], ids[2]: []},
    )
    assert _paths(library, build_filter(FilterArgs(tags=("CAT",)))) == {"/p/a.jpg", "/p/b.jpg"}
    both = build_filter(FilterArgs(tags=("cat", "Outdoor")))
    assert _paths(library, both) == {"/p/a.jpg"}


# -- the filtered top-k -----------------------------------------------------------------------
def test_one_percent_filter_top_k_equals_brute_force_over_the_filtered_set(library, engine):
    n = 5000
    v = vectors(n, seed=3)
    rare = set(range(0, n, 100))  # 1% of the library
    records = [
        record(
            f"/lib/{'leica' if i in rare else 'phone'}/{i}.jpg",
            v[i],
            camera_make="Leica" if i in rare else "Apple",
        )
        for i in range(n)
    ]
    ids = np.asarray(store(library, records))
    query = l2_normalise(v[7] + v[1300] + np.random.default_rng(9).standard_normal(512) * 0.05)
    mask = np.asarray([i in rare for i in range(n)])
    truth_scores = v[mask] @ query
    order = np.argsort(-truth_scores, kind="stable")[:20]
    truth_ids = ids[mask][order].tolist()
    assert_clear_order(np.sort(truth_scores)[::-1][:21])  # 20 ranks and the 21st left out

    for spec in ({"camera": "leica"}, {"folders": ("/lib/leica",)}):
        page = engine.search(query, SearchOptions(k=20, **spec))
        assert [r.id for r in page.results] == truth_ids
        assert [r.score for r in page.results] == pytest.approx(truth_scores[order], abs=1e-5)
    # ...whereas the unfiltered top-20 holds (almost) none of them: filtering it afterwards
    # would have returned a handful of results, not 20.
    unfiltered = {r.id for r in engine.search(query, SearchOptions(k=20)).results}
    assert len(unfiltered & set(truth_ids)) <= 2

    # The same holds for a cut-off list (range search restricted during the scan).
    # The threshold sits halfway between the 29th and 30th best score, never on a score:
    # FAISS and numpy round differently, so a score equal to it could land either side.
    threshold = threshold_between(truth_scores, keep=29)
    page = engine.search(
        query, SearchOptions(k=100, camera="leica", min_score=threshold)
    )
    expected = ids[mask][truth_scores > threshold]
    assert len(expected) == 29
    assert page.total == len(expected) and {r.id for r in page.results} == set(expected.tolist())


def test_a_filter_that_matches_nothing_returns_nothing(library, engine):
    store(library, [record("/p/a.jpg", vectors(1)[0])])
    page = engine.search(vectors(1)[0], SearchOptions(camera="none"))
    assert page.results == [] and page.total is None


# -- order and paging -------------------------------------------------------------------------
def test_offset_pages_through_one_stable_order_with_ties_by_id(library, engine):
    v = vectors(10, seed=5)
    duplicated = [v[i // 2] for i in range(20)]  # pairs of identical vectors: exact ties
    ids = store(library, [record(f"/p/{i}.jpg", duplicated[i]) for i in range(20)])
    query = v[0]
    full = engine.search(query, SearchOptions(k=20)).results
    pages = [
        engine.search(query, SearchOptions(k=6, offset=offset)).results
        for offset in (0, 6, 12, 18)
    ]
    assert [r.id for page in pages for r in page] == [r.id for r in full]
    for a, b in itertools.pairwise(full):
        assert (a.score, -a.id) >= (b.score, -b.id)  # score desc, then id asc
    assert sorted(r.id for r in full) == sorted(ids)


def test_sort_by_date_orders_the_kept_results_and_pages_stably(library, engine):
    rng = np.random.default_rng(11)
    base = l2_normalise(rng.standard_normal(512))
    records = []
    for i in range(30):
        relevant = i % 3 == 0  # 10 photos close to the query, 20 unrelated
        noise = rng.standard_normal(512)
        vector = l2_normalise(base + 0.03 * noise) if relevant else vectors(1, 100 + i)[0]
        when = dt.datetime(2020, 1, 1) + dt.timedelta(days=int(rng.integers(0, 5)))
        records.append(record(f"/p/{i}.jpg", vector, taken_at=when))
    store(library, records)
    page = engine.search(base, SearchOptions(k=30, sort="date"))
    assert page.cutoff is not None and page.cutoff.rule == "auto"  # a date sort implies it
    kept = page.results
    assert {int(r.path.split("/")[-1][:-4]) % 3 for r in kept} == {0} and len(kept) == 10
    keys = [(dt.datetime.fromisoformat(r.taken_at), r.score, -r.id) for r in kept]
    assert keys == sorted(keys, key=lambda key: (key[0], key[1], key[2]), reverse=True)
    paged = [
        r.id
        for offset in range(0, 10, 4)
        for r in engine.search(base, SearchOptions(k=4, offset=offset, sort="date")).results
    ]
    assert paged == [r.id for r in kept]
    oldest = engine.search(base, SearchOptions(k=30, sort="date-asc")).results
    assert [r.taken_at for r in oldest] == sorted(r.taken_at for r in kept)


def test_paging_limits_and_bad_values(library, engine):
    store(library, [record("/p/a.jpg", vectors(1)[0])])
    with pytest.raises(QueryError, match="offset \\+ k"):
        engine.search(vectors(1)[0], SearchOptions(k=10, offset=9_995))
    with pytest.raises(QueryError, match="sort"):
        engine.search(vectors(1)[0], SearchOptions(sort="name"))
    # With a cut-off the kept list can be paged as deep as it goes.
    page = engine.search(vectors(1)[0], SearchOptions(k=10, offset=20_000, min_score=-1))
    assert page.results == [] and page.total == 1


# -- CLI ------------------------------------------------------------------------------------
def test_cli_filters_json(fake_model, photo_folder, tmp_path):
    run("index", str(photo_folder), "--json")

    def ids(*args: str) -> list[str]:
        result = run("search", "anything", "--json", *args)
        assert result.exit_code == 0, result.output
        return sorted(r["path"].rsplit("/", 1)[1] for r in json.loads(result.stdout)["results"])

    assert ids("--min-size", "350x240") == ["photo_3.jpg", "photo_4.jpg", "photo_5.jpg"]
    assert len(ids("--in", str(photo_folder), "--format", "jpg")) == 6
    assert ids("--in", str(tmp_path / "elsewhere")) == []
    assert len(ids("--after", "2000", "--before", "2999")) == 6  # by mtime: no EXIF here
    page = json.loads(run("search", "x", "--json", "-k", "2", "--offset", "2").stdout)
    assert (page["offset"], page["k"], page["total"], len(page["results"])) == (2, 2, None, 2)

    bad = run("search", "x", "--after", "yesterday-ish")
    assert bad.exit_code == 1 and "is not a date" in bad.output
    untagged = run("search", "x", "--tag", "cat")
    assert untagged.exit_code == 1 and "clipdex tag" in untagged.output
    assert run("search", "x", "--sort", "name").exit_code == 2
    assert run("search", "x", "--offset", "-1").exit_code == 2


def test_cli_similar_with_cutoff_and_date_sort(fake_model, photo_folder):
    run("index", str(photo_folder), "--json")
    first = json.loads(run("search", "x", "-k", "1", "--json").stdout)["results"][0]
    document = json.loads(
        run("similar", str(first["id"]), "--cutoff", "auto", "--sort", "date", "--json").stdout
    )
    assert document["cutoff"]["rule"] == "auto" and document["sort"] == "date"
    assert first["id"] in [r["id"] for r in document["results"]]


def test_a_folder_filter_reads_the_path_index_not_every_row(library):
    """`--in FOLDER` costs what lies in the folder: SQLite answers it from the path index
    (a range), and the range holds the folder's subfolders but no sibling sharing a prefix."""
    v = vectors(4)
    store(
        library,
        [
            record("/photos/a/x.jpg", v[0]),
            record("/photos/a/deep/y.jpg", v[1]),
            record("/photos/a0/z.jpg", v[2]),
            record("/photos/a-b/w.jpg", v[3]),
        ],
    )
    assert _paths(library, ImageFilter(folders=("/photos/a",))) == {
        "/photos/a/x.jpg",
        "/photos/a/deep/y.jpg",
    }
    where, params = filter_sql(ImageFilter(folders=("/photos/a",)))
    with library.catalog.engine.connect() as conn:
        plan = conn.exec_driver_sql(
            f"EXPLAIN QUERY PLAN SELECT id FROM images WHERE {where}", tuple(params)
        ).all()
    detail = " ".join(str(row[-1]) for row in plan)
    assert "USING" in detail and "INDEX" in detail and "(path>? AND path<?)" in detail, detail


def test_with_frames_adds_the_frames_of_allowed_videos_and_nothing_else():
    """A filter's allowed ids bring their videos' frames; without any (no video among them)
    the allowed ids come back as they are (no union over a whole library per query)."""

    class OneVideo:  # a catalog stand-in: video 5 is indexed as its row and frames 90, 91
        def frame_ids_of(self, ids) -> np.ndarray:
            return np.asarray([90, 91] if 5 in np.asarray(ids) else [], np.int64)

    assert with_frames(OneVideo(), np.asarray([1, 5, 7])).tolist() == [1, 5, 7, 90, 91]
    photos = np.asarray([1, 7], np.int64)
    assert with_frames(OneVideo(), photos) is photos
    assert with_frames(OneVideo(), np.asarray([7, 1, 7])).tolist() == [1, 7]


# The date rule as the catalog's SQL wrote it before schema 10 (a scan of every row): the
# index ranges must select the same rows.
_JULIAN = (
    "coalesce(julianday(images.taken_at), "
    "julianday(images.mtime_ns / 1000000000.0, 'unixepoch', 'localtime'))"
)


def test_date_filters_are_ranges_of_the_capture_index_and_select_what_the_rule_says(library):
    """`--after`/`--before` read the capture index (EXIF time, else mtime: schema 10), not
    every row, and keep exactly the rows whose capture time (EXIF, else the local mtime) is
    in range, checked against the rule written as a scan."""
    rng = np.random.default_rng(7)
    v = vectors(300, seed=3)
    start = dt.datetime(2009, 1, 1)
    records = []
    for i in range(300):
        when = start + dt.timedelta(days=float(rng.uniform(0, 15 * 365)))
        exif = {"taken_at": when} if i % 3 else {}  # a third have only their mtime
        mtime = when if not exif else when + dt.timedelta(days=400)  # copied later
        records.append(record(f"/p/{i}.jpg", v[i], mtime=mtime, **exif))
    store(library, records)
    catalog = library.catalog
    for after, before in ((2012, None), (None, 2015), (2013, 2014), (2016, 2022)):
        spec = ImageFilter(
            after=dt.datetime(after, 3, 1) if after else None,
            before=dt.datetime(before, 7, 1) if before else None,
        )
        terms, params = [], []
        if spec.after:
            terms.append(f"{_JULIAN} >= julianday(?)")
            params.append(spec.after.isoformat(sep=" "))
        if spec.before:
            terms.append(f"{_JULIAN} < julianday(?)")
            params.append(spec.before.isoformat(sep=" "))
        want = catalog.ids_where(" AND ".join(terms), params)
        assert 0 < len(want) < 300
        assert np.array_equal(allowed_ids(catalog, spec), want)
        where, params = filter_sql(spec)
        with catalog.engine.connect() as conn:
            plan = conn.exec_driver_sql(
                f"EXPLAIN QUERY PLAN SELECT id FROM images WHERE {where}", tuple(params)
            ).all()
        detail = " ".join(str(row[-1]) for row in plan)
        assert "ix_images_capture" in detail and "SCAN images" not in detail, detail


def test_kind_photo_in_a_library_without_videos_filters_nothing(library):
    """Every row is a photo: `--kind photo` alone lets everything through without listing
    the library's ids (a video makes it a real filter again)."""
    v = vectors(3)
    store(library, [record("/p/a.jpg", v[0]), record("/p/b.jpg", v[1])])
    assert allowed_ids(library.catalog, ImageFilter(kind="photo")) is None
    both = ImageFilter(kind="photo", formats=("JPEG",))
    assert len(allowed_ids(library.catalog, both)) == 2
    store(library, [record("/p/c.mp4", v[2], format="MP4", kind="video")])
    photos = allowed_ids(library.catalog, ImageFilter(kind="photo"))
    assert photos is not None and len(photos) == 2


def test_a_catalog_from_schema_9_gets_the_capture_index(tmp_path):
    import sqlite3

    from indexer.store.catalog import SCHEMA_VERSION

    root = tmp_path / "lib"
    with Library.open(root, create=True) as lib:
        store(lib, [record("/p/a.jpg", vectors(1)[0], taken_at=dt.datetime(2020, 1, 1))])
    path = Library.catalog_path(root)
    with sqlite3.connect(path) as conn:
        conn.execute("DROP INDEX ix_images_capture")
        conn.execute("UPDATE meta SET value = '9' WHERE key = 'schema_version'")
    conn.close()
    with Library.open(root) as lib:
        assert lib.catalog.get_meta("schema_version") == str(SCHEMA_VERSION) == "10"
        spec = ImageFilter(after=dt.datetime(2019, 1, 1))
        assert len(allowed_ids(lib.catalog, spec)) == 1
    with sqlite3.connect(path) as conn:
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    assert "ix_images_capture" in names
