"""MP16's deterministic val split: a hashed slice of the image ids (≈ 5,000 of 4.72 M), taken where its
rows get their split (prepare_from_manifest), the same ids in every build."""

from __future__ import annotations

from locdiff.datasets.prepare import prepare_from_manifest
from locdiff.datasets.registry import REGISTRY, VAL_BUCKETS, val_mask
from locdiff.storage import Store
from tests.data.test_datasets import jpeg


def _ids(n: int, offset: int = 0) -> list[str]:
    return [f"{i % 97:02x}/{i % 89:02x}/{i}.jpg" for i in range(offset, offset + n)]  # MP16's IMG_ID shape


def test_the_val_slice_is_a_pure_function_of_the_id_and_about_5000_of_mp16():
    buckets = REGISTRY["mp16"].val_buckets
    assert round(4_720_000 * buckets / VAL_BUCKETS) in range(4_500, 5_500)
    ids = _ids(300_000)
    mask = val_mask(ids, buckets)
    # same ids -> same split, whatever the order or the other rows
    picked = {i for i, m in zip(ids, mask, strict=True) if m}
    shuffled = ids[::-7] + ids[1::7]
    again = {i for i, m in zip(shuffled, val_mask(shuffled, buckets), strict=True) if m}
    assert again == picked & set(shuffled) and again
    # the fraction: 318 expected of 300,000 (sd 18)
    assert 250 <= len(picked) <= 390


def test_prepare_mp16_takes_the_hashed_val_rows_out_of_train(tmp_path):
    store = Store.from_uri(str(tmp_path / "store"))
    candidates = _ids(20_000)
    mask = val_mask(candidates, REGISTRY["mp16"].val_buckets)
    val_ids = [i for i, m in zip(candidates, mask, strict=True) if m][:2]
    train_ids = [i for i, m in zip(candidates, mask, strict=True) if not m][:4]
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rows = ["IMG_ID,path,LAT,LON"]
    for n, image_id in enumerate(val_ids + train_ids):
        (imgs / f"{n}.jpg").write_bytes(jpeg(n))
        rows.append(f"{image_id},{n}.jpg,{n},{n}")
    manifest = tmp_path / "mp16.csv"
    manifest.write_text("\n".join(rows) + "\n")

    key = prepare_from_manifest(store, "mp16", manifest, images_root=imgs, default_split="train")
    assert store.manifest(key)["splits"] == {"train": 4, "val": 2}
    table = store.read_table(key, "manifest.parquet", columns=["image_id", "split"]).to_pylist()
    split = {r["image_id"]: r["split"] for r in table}
    assert {i for i, s in split.items() if s == "val"} == set(val_ids)
    # another dataset with the same rows keeps them all in train
    other = prepare_from_manifest(store, "mine", manifest, images_root=imgs, default_split="train")
    assert store.manifest(other)["splits"] == {"train": 6}
