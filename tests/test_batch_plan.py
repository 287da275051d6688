"""Discovery of inputs and the plan: mirrored outputs, conflicts, resume."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from batch.runs.plan import make_plan
from batch.runs.storage import Listing, LocalFolder, walk_images


def touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def rels(*names: str) -> list[PurePosixPath]:
    return [PurePosixPath(n) for n in names]


def test_find_images_is_recursive_sorted_and_case_blind(tmp_path: Path):
    touch(tmp_path, "b.JPG", "a.png", "z/y.jpeg", "m/n/o.Jpg", "notes.txt", "x.gif", ".hidden.jpg", ".cache/k.jpg")
    (tmp_path / "dir.jpg").mkdir()  # a folder named like an image is not one: it is reported
    listing = walk_images(tmp_path)
    assert listing.images == rels("a.png", "b.JPG", "m/n/o.Jpg", "z/y.jpeg")
    assert [(name, "folder" in reason) for name, reason in listing.skipped] == [(str(tmp_path / "dir.jpg"), True)]


def test_output_folder_inside_the_input_is_not_read(tmp_path: Path):
    touch(tmp_path, "a.jpg", "masks/a.png", "masks/sub/b.png", "other/c.jpg")
    assert walk_images(tmp_path, exclude=tmp_path / "masks").images == rels("a.jpg", "other/c.jpg")


def test_symlinked_output_folder_is_recognised(tmp_path: Path):
    touch(tmp_path, "in/a.jpg", "real_out/a.png")
    (tmp_path / "in" / "out").symlink_to(tmp_path / "real_out")
    # links to folders are not followed anyway; the excluded folder is matched by identity
    assert walk_images(tmp_path / "in", exclude=tmp_path / "real_out").images == rels("a.jpg")


def plan_of(source: Path, output: Path, names: list[PurePosixPath], formats: tuple[str, ...], overwrite: bool):
    return make_plan(LocalFolder(source), LocalFolder(output), Listing(names, []), formats, overwrite)


def test_plan_mirrors_the_tree(tmp_path: Path):
    plan = plan_of(tmp_path / "in", tmp_path / "out", rels("a.jpg", "d/b.png"), ("png", "rle"), overwrite=False)
    assert [job.name for job in plan.jobs] == ["a.jpg", "d/b.png"]
    assert plan.jobs[1].source == str(tmp_path / "in" / "d" / "b.png")
    assert plan.jobs[1].outputs == {"png": PurePosixPath("d/b.png"), "rle": PurePosixPath(".rle/d/b.png.rle")}
    assert plan.jobs[1].todo == ("png", "rle")
    assert not plan.done and not plan.refused


def test_same_stem_is_a_conflict_for_both(tmp_path: Path):
    plan = plan_of(tmp_path / "in", tmp_path / "out", rels("a/x.jpg", "a/x.png", "a/y.jpg", "b/x.jpg"), ("png",), False)
    assert [job.name for job in plan.jobs] == ["a/y.jpg", "b/x.jpg"]
    assert [job.name for job, _ in plan.refused] == ["a/x.jpg", "a/x.png"]
    reason = plan.refused[0][1]
    assert "a/x.jpg and a/x.png" in reason and str(tmp_path / "out" / "a" / "x.png") in reason


def test_conflicts_depend_on_the_formats(tmp_path: Path):
    names = rels("car.jpg", "car_cutout.png")
    assert not plan_of(tmp_path, tmp_path / "out", names, ("png",), False).refused
    assert len(plan_of(tmp_path, tmp_path / "out", names, ("png", "cutout"), False).refused) == 2
    # RLE files are named after the whole input name: x.jpg and x.png can both be in one CSV
    assert not plan_of(tmp_path, tmp_path / "out", rels("x.jpg", "x.png"), ("rle",), False).refused


def test_finished_photos_are_skipped_and_partial_ones_completed(tmp_path: Path):
    out = tmp_path / "out"
    touch(out, "a.png", "a.gif", "b.png")
    plan = plan_of(tmp_path, out, rels("a.jpg", "b.jpg", "c.jpg"), ("png", "gif"), overwrite=False)
    assert [job.name for job in plan.done] == ["a.jpg"]
    assert [(job.name, job.todo) for job in plan.jobs] == [("b.jpg", ("gif",)), ("c.jpg", ("png", "gif"))]
    assert [job.name for job in plan.all_jobs] == ["a.jpg", "b.jpg", "c.jpg"]
    again = plan_of(tmp_path, out, rels("a.jpg", "b.jpg", "c.jpg"), ("png", "gif"), overwrite=True)
    assert not again.done and all(job.todo == ("png", "gif") for job in again.jobs)


def test_a_newcomer_that_clashes_with_a_finished_photo_is_the_only_one_refused(tmp_path: Path):
    """x.png added beside x.jpg, which an earlier run finished: x.jpg stays done, x.png alone is refused."""
    out = tmp_path / "out"
    touch(out, "x.png")
    names = rels("x.jpg", "x.png")
    plan = make_plan(LocalFolder(tmp_path), LocalFolder(out), Listing(names, []), ("png",), False, finished={"x.jpg"})
    assert [job.name for job in plan.done] == ["x.jpg"]
    assert [(job.name, "x.jpg by an earlier run" in reason) for job, reason in plan.refused] == [("x.png", True)]
    fresh = make_plan(LocalFolder(tmp_path), LocalFolder(out), Listing(names, []), ("png",), False)
    assert [job.name for job, _ in fresh.refused] == ["x.jpg", "x.png"]  # no earlier run: neither is preferred
