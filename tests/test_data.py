import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from visionmoe.data import (
    Compose,
    DataFileError,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    create_dataset,
    default_augmentation,
    digit_count_groups,
    list_datasets,
)
from visionmoe.data.digits import load_digit_scans, split_indices


def test_list_datasets():
    assert list_datasets() == ["cifar10", "cifar100", "digit_scenes", "digits", "image_folder"]
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        create_dataset("mnist", "train")


# ----------------------------------------------------------------------------------------------------- digits


def test_digits_splits_are_fixed_disjoint_and_cover_all_scans():
    splits = {split: split_indices(split) for split in ("train", "val", "test")}
    sizes = {split: len(indices) for split, indices in splits.items()}
    assert sizes == {"train": 1258, "val": 180, "test": 359}
    everything = torch.cat(list(splits.values()))
    assert sorted(everything.tolist()) == list(range(1797))
    assert torch.equal(split_indices("train"), splits["train"])


def test_digits_shapes_labels_and_normalisation():
    train = create_dataset("digits", "train")
    assert (len(train), train.num_classes, train.image_size, train.in_chans) == (1258, 10, 32, 3)
    assert train.classes == tuple("0123456789")
    image, label = train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert isinstance(label, int) and 0 <= label < 10
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    stacked = torch.stack([train[i][0] for i in range(len(train))])
    assert abs(float(stacked.mean())) < 1e-4 and abs(float(stacked.std()) - 1.0) < 1e-3
    labels = torch.tensor([train[i][1] for i in range(len(train))])
    assert set(labels.tolist()) == set(range(10))
    # the label of each item is the label of the scan it shows
    scans, scan_labels = load_digit_scans()
    assert torch.equal(labels, scan_labels[train.source_indices])


def test_digits_options_and_determinism():
    test_a = create_dataset("digits", "test", in_chans=1, image_size=16)
    test_b = create_dataset("digits", "test", in_chans=1, image_size=16)
    assert test_a[5][0].shape == (1, 16, 16)
    assert torch.equal(test_a[5][0], test_b[5][0]) and test_a[5][1] == test_b[5][1]
    # val and test are normalised with the training statistics, not their own
    assert test_a.mean == create_dataset("digits", "train", image_size=16).mean
    with pytest.raises(ValueError, match="split must be one of train, val, test"):
        create_dataset("digits", "validation")
    with pytest.raises(ValueError, match="in_chans must be 1 or 3"):
        create_dataset("digits", "train", in_chans=2)
    with pytest.raises(ValueError, match="takes no root"):
        create_dataset("digits", "train", root="/data")


def test_digits_augment_shifts_without_flipping():
    plain = create_dataset("digits", "train")
    augmented = create_dataset("digits", "train", augment=True)
    assert not any(isinstance(t, RandomHorizontalFlip) for t in augmented.transform.transforms)
    torch.manual_seed(3)
    images = [augmented[0][0] for _ in range(8)]
    assert all(image.shape == (3, 32, 32) for image in images)
    assert any(not torch.equal(image, plain[0][0]) for image in images)


# ------------------------------------------------------------------------------------------------ digit_scenes


def test_digit_scenes_boxes_masks_and_labels():
    scenes = create_dataset("digit_scenes", "train", length=40)
    assert (len(scenes), scenes.image_size, scenes.in_chans, scenes.num_classes) == (40, 64, 3, 10)
    for index in range(len(scenes)):
        image, primary = scenes[index]
        targets = scenes.targets(index)
        boxes, masks, labels = targets["boxes"], targets["masks"], targets["labels"]
        count = labels.shape[0]
        assert image.shape == (3, 64, 64)
        assert float(image.min()) >= -1.0 and float(image.max()) <= 1.0
        assert 1 <= count <= 4 and boxes.shape == (count, 4) and masks.shape == (count, 64, 64)
        assert masks.dtype == torch.bool and bool(masks.flatten(1).any(dim=1).all())
        assert int(masks.sum(dim=0).max()) == 1  # objects never overlap
        assert bool((boxes[:, :2] >= 0).all()) and bool((boxes[:, 2:] <= 64).all())
        assert bool((boxes[:, 2:] > boxes[:, :2]).all())
        for box, mask in zip(boxes.long().tolist(), masks):
            x0, y0, x1, y1 = box
            inside = torch.zeros_like(mask)
            inside[y0:y1, x0:x1] = True
            assert not bool((mask & ~inside).any())  # the box contains the mask
            # and is tight: every edge row and column of the box touches the mask
            assert bool(mask[y0, x0:x1].any()) and bool(mask[y1 - 1, x0:x1].any())
            assert bool(mask[y0:y1, x0].any()) and bool(mask[y0:y1, x1 - 1].any())
            # the mask is where the digit is bright
            assert bool((image[0][mask] > (2 * scenes.mask_threshold - 1)).all())
        areas = masks.flatten(1).sum(dim=1)
        assert primary == targets["primary_label"] == int(labels[int(areas.argmax())])
        assert targets["multi_hot"].nonzero().flatten().tolist() == sorted(set(labels.tolist()))
        _, scan_labels = load_digit_scans()
        assert torch.equal(scan_labels[targets["source_indices"]], labels)


def test_digit_scenes_deterministic_by_seed():
    first = create_dataset("digit_scenes", "val", seed=7, length=5, with_targets=True)
    again = create_dataset("digit_scenes", "val", seed=7, length=5, with_targets=True)
    other = create_dataset("digit_scenes", "val", seed=8, length=5)
    for index in (0, 4):
        image_a, targets_a = first[index]
        image_b, targets_b = again[index]
        assert torch.equal(image_a, image_b)
        for key in ("boxes", "masks", "labels", "source_indices"):
            assert torch.equal(targets_a[key], targets_b[key])
    assert any(not torch.equal(first[i][0], other[i][0]) for i in range(5))
    with pytest.raises(IndexError):
        first[5]


def test_digit_scenes_splits_use_disjoint_source_digits():
    used = {}
    for split in ("train", "test"):
        scenes = create_dataset("digit_scenes", split, length=30, canvas_size=48, digit_size=(12, 16))
        assert scenes[0][0].shape == (3, 48, 48)
        sources = torch.cat([scenes.targets(i)["source_indices"] for i in range(len(scenes))])
        assert set(sources.tolist()) <= set(split_indices(split).tolist())
        used[split] = set(sources.tolist())
    assert not used["train"] & used["test"]


def test_digit_scenes_bad_options():
    with pytest.raises(ValueError, match="digit_size"):
        create_dataset("digit_scenes", "train", canvas_size=32, digit_size=(16, 40))
    with pytest.raises(ValueError, match="min_digits"):
        create_dataset("digit_scenes", "train", min_digits=3, max_digits=2)


def test_digit_scenes_same_class_scenes_hold_instances_of_one_class():
    scenes = create_dataset(
        "digit_scenes",
        "train",
        length=30,
        canvas_size=32,
        digit_size=(10, 14),
        min_digits=1,
        max_digits=3,
        classes="same",
    )
    counts = set()
    for index in range(len(scenes)):
        image, primary = scenes[index]
        labels = scenes.targets(index)["labels"]
        counts.add(labels.shape[0])
        assert image.shape == (3, 32, 32)
        assert set(labels.tolist()) == {primary}  # every digit of the scene is of the one class
    assert counts == {1, 2, 3}
    sources = torch.cat([scenes.targets(i)["source_indices"] for i in range(len(scenes))])
    assert set(sources.tolist()) <= set(split_indices("train").tolist())


def test_digit_scenes_multi_hot_labels_and_digit_count_groups():
    scenes = create_dataset(
        "digit_scenes",
        "test",
        length=20,
        canvas_size=32,
        digit_size=(10, 14),
        min_digits=1,
        max_digits=3,
        label="multi_hot",
    )
    targets = [scenes.targets(i) for i in range(len(scenes))]
    for index, target in enumerate(targets):
        _, label = scenes[index]
        assert label.dtype == torch.float32 and label.shape == (10,)
        assert label.nonzero().flatten().tolist() == sorted(set(target["labels"].tolist()))
    groups = digit_count_groups(targets)
    counts = [t["labels"].shape[0] for t in targets]
    assert groups["all"].tolist() == list(range(20))
    assert groups["1"].tolist() == [i for i, c in enumerate(counts) if c == 1]
    assert groups[">=2"].tolist() == [i for i, c in enumerate(counts) if c >= 2]
    assert groups["1"].numel() and groups[">=2"].numel()


def test_digit_scenes_bad_class_and_label_options():
    with pytest.raises(ValueError, match="classes"):
        create_dataset("digit_scenes", "train", classes="one")
    with pytest.raises(ValueError, match="label"):
        create_dataset("digit_scenes", "train", label="soft")


# ------------------------------------------------------------------------------------------------------- CIFAR


def _pickle(path, payload):
    with open(path, "wb") as handle:
        pickle.dump(payload, handle)


def _fake_cifar10(root, images_per_batch=3):
    """The official layout: five training batches, a test batch and batches.meta, pickled dicts of bytes keys."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    for number, name in enumerate(names):
        data = rng.randint(0, 256, size=(images_per_batch, 3072)).astype(np.uint8)
        labels = [(number + i) % 10 for i in range(images_per_batch)]
        _pickle(
            folder / name,
            {
                b"batch_label": name.encode(),
                b"labels": labels,
                b"data": data,
                b"filenames": [b"x.png"] * images_per_batch,
            },
        )
    class_names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _pickle(folder / "batches.meta", {b"label_names": class_names, b"num_vis": 3072})
    return folder


def _tar(folder, archive):
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def test_cifar10_from_directory_and_archive(tmp_path):
    folder = _fake_cifar10(tmp_path / "extracted")
    archive = _tar(folder, tmp_path / "cifar-10-python.tar.gz")
    with open(folder / "data_batch_2", "rb") as handle:
        raw = pickle.load(handle, encoding="bytes")
    for root in (tmp_path / "extracted", folder, archive):
        train = create_dataset("cifar10", "train", root=str(root))
        test = create_dataset("cifar10", "test", root=root)
        assert (len(train), len(test), train.num_classes) == (15, 3, 10)
        assert train.classes[0] == "airplane" and train.classes[9] == "truck"
        image, label = train[3]  # first image of data_batch_2
        assert image.shape == (3, 32, 32) and label == raw[b"labels"][0]
        expected = torch.from_numpy(raw[b"data"][0].reshape(3, 32, 32).astype(np.float32) / 255.0)
        expected = (expected - torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)) / torch.tensor(
            [0.2470, 0.2435, 0.2616]
        ).view(3, 1, 1)
        torch.testing.assert_close(image, expected)


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    for name, fine in (("train", [41, 99]), ("test", [0, 7])):
        _pickle(folder / name, {b"data": data, b"fine_labels": fine, b"coarse_labels": [1, 2]})
    _pickle(
        folder / "meta",
        {b"fine_label_names": [f"class{i}".encode() for i in range(100)], b"coarse_label_names": [b"c"] * 20},
    )
    archive = _tar(folder, tmp_path / "cifar-100-python.tar.gz")
    for root in (tmp_path, archive):
        train = create_dataset("cifar100", "train", root=root)
        assert train.num_classes == 100 and [train[i][1] for i in range(2)] == [41, 99]


def test_cifar_missing_and_corrupt_paths(tmp_path):
    with pytest.raises(ValueError, match="needs root"):
        create_dataset("cifar10", "train")
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        create_dataset("cifar10", "train", root=missing)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py/data_batch_1"):
        create_dataset("cifar10", "train", root=tmp_path)
    folder = _fake_cifar10(tmp_path / "broken")
    os.remove(folder / "data_batch_4")
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        create_dataset("cifar10", "train", root=folder)
    (folder / "data_batch_4").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="corrupt CIFAR file .*data_batch_4"):
        create_dataset("cifar10", "train", root=folder)
    _pickle(folder / "data_batch_4", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(ValueError, match=r"expected data \[N, 3072\]"):
        create_dataset("cifar10", "train", root=folder)
    truncated = tmp_path / "cifar-10-python.tar.gz"
    full = _tar(_fake_cifar10(tmp_path / "good"), tmp_path / "full.tar.gz").read_bytes()
    truncated.write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match="corrupt CIFAR"):
        create_dataset("cifar10", "test", root=truncated)
    os.remove(folder / "data_batch_4")
    with pytest.raises(FileNotFoundError, match="lacks cifar-10-batches-py/data_batch_4"):
        create_dataset("cifar10", "train", root=_tar(folder, tmp_path / "incomplete.tar.gz"))
    with pytest.raises(ValueError, match="split must be one of train, test"):
        create_dataset("cifar10", "val", root=folder)


# ------------------------------------------------------------------------------------------------ image_folder


def _write_images(directory, classes, per_class=2):
    rng = np.random.RandomState(1)
    for name in classes:
        (directory / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.randint(0, 256, size=(20, 24, 3)).astype(np.uint8)
            Image.fromarray(pixels).save(directory / name / f"{i}.png")


def test_image_folder_reads_and_resizes(tmp_path):
    _write_images(tmp_path / "train", ["cat", "dog", "ant"])
    train = create_dataset("image_folder", "train", root=tmp_path, image_size=16)
    assert train.classes == ("ant", "cat", "dog") and train.num_classes == 3 and len(train) == 6
    image, label = train[2]
    assert image.shape == (3, 16, 16) and label == 1
    assert float(image.min()) >= -1.0 and float(image.max()) <= 1.0
    grey = create_dataset("image_folder", "all", root=tmp_path / "train", image_size=8, in_chans=1)
    assert grey[0][0].shape == (1, 8, 8) and grey[5][1] == 2
    # a plain PNG read back agrees with Pillow's own resize
    source = Image.open(tmp_path / "train" / "ant" / "0.png").convert("RGB").resize((16, 16), Image.BILINEAR)
    expected = torch.from_numpy(np.asarray(source, np.float32) / 255.0).permute(2, 0, 1)
    torch.testing.assert_close(train[0][0], (expected - 0.5) / 0.5)


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="needs root"):
        create_dataset("image_folder", "train")
    with pytest.raises(FileNotFoundError, match="missing"):
        create_dataset("image_folder", "train", root=tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no split directory"):
        create_dataset("image_folder", "train", root=tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match="no class sub-directories"):
        create_dataset("image_folder", "train", root=tmp_path)
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        create_dataset("image_folder", "train", root=tmp_path)
    (tmp_path / "train" / "empty" / "bad.png").write_bytes(b"not an image")
    broken = create_dataset("image_folder", "train", root=tmp_path)
    with pytest.raises(DataFileError, match="cannot read image .*bad.png"):
        broken[0]
    with pytest.raises(ValueError, match="bad_images must be one of error, check, skip, got 'ignore'"):
        create_dataset("image_folder", "train", root=tmp_path, bad_images="ignore")
    with pytest.raises(DataFileError, match="1 of 1 images in .* cannot be read"):
        create_dataset("image_folder", "train", root=tmp_path, bad_images="skip")  # nothing would be left


def test_image_folder_finds_or_skips_unreadable_images_up_front(tmp_path):
    _write_images(tmp_path / "train", ["cat", "dog"])
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"not an image")
    whole = (tmp_path / "train" / "dog" / "0.png").read_bytes()
    (tmp_path / "train" / "dog" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    lazy = create_dataset("image_folder", "train", root=tmp_path)
    assert len(lazy) == 6
    with pytest.raises(DataFileError, match=r"cannot read image .*broken.png.*bad_images='check' finds every such"):
        lazy[2]
    with pytest.raises(DataFileError, match=r"2 of 6 images in .* cannot be read: .*broken.png.*truncated.png"):
        create_dataset("image_folder", "train", root=tmp_path, bad_images="check")
    with pytest.warns(UserWarning, match=r"skipping 2 of 6 images in .*broken.png.*truncated.png"):
        skipped = create_dataset("image_folder", "train", root=tmp_path, bad_images="skip")
    assert skipped.classes == ("cat", "dog") and len(skipped) == 4
    assert [label for _, label in skipped.samples] == [0, 0, 1, 1]
    assert skipped[3][0].shape == (3, 32, 32)


# ------------------------------------------------------------------------------------------------ augmentations


def test_augmentations_shapes_and_determinism():
    image = torch.arange(3 * 8 * 10, dtype=torch.float32).reshape(3, 8, 10)
    pipeline = Compose([RandomCrop(padding=2), RandomHorizontalFlip(0.5), Normalize([1.0, 2.0, 3.0], [2.0, 2.0, 2.0])])
    outputs = [pipeline(image, generator=torch.Generator().manual_seed(s)) for s in range(12)]
    assert all(out.shape == (3, 8, 10) for out in outputs)
    again = pipeline(image, generator=torch.Generator().manual_seed(5))
    assert torch.equal(outputs[5], again)
    assert len({tuple(out.flatten().tolist()) for out in outputs}) > 1
    assert RandomCrop(size=6, padding=0)(image, generator=torch.Generator().manual_seed(0)).shape == (3, 6, 6)


def test_augmentation_semantics():
    image = torch.rand(2, 5, 5)
    assert torch.equal(RandomHorizontalFlip(1.0)(image), image.flip(-1))
    assert torch.equal(RandomHorizontalFlip(0.0)(image), image)
    # with no padding and full size the crop is the identity; with padding it is a shift filled with zeros
    assert torch.equal(RandomCrop(padding=0)(image), image)
    shifted = RandomCrop(padding=1)(image, generator=torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(image, (1, 1, 1, 1))
    windows = [padded[:, top : top + 5, left : left + 5] for top in range(3) for left in range(3)]
    assert any(torch.equal(shifted, window) for window in windows)
    torch.testing.assert_close(Normalize([0.5], [0.25])(image), (image - 0.5) / 0.25)
    with pytest.raises(ValueError, match="image must be a tensor"):
        RandomCrop()(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="std must be positive"):
        Normalize([0.0], [0.0])
    with pytest.raises(ValueError, match="p must be in"):
        RandomHorizontalFlip(1.5)
    augmentation = default_augmentation(32, flip=True)
    assert [type(t) for t in augmentation.transforms] == [RandomCrop, RandomHorizontalFlip]


def test_digits_batches_through_a_dataloader():
    loader = torch.utils.data.DataLoader(create_dataset("digits", "val"), batch_size=32, shuffle=False)
    images, labels = next(iter(loader))
    assert images.shape == (32, 3, 32, 32) and labels.dtype == torch.int64
    assert sum(len(batch_labels) for _, batch_labels in loader) == 180


def test_digit_scenes_batch_with_collate_scenes():
    from visionmoe.data import collate_scenes

    scenes = create_dataset("digit_scenes", "test", length=6, with_targets=True)
    loader = torch.utils.data.DataLoader(scenes, batch_size=4, collate_fn=collate_scenes)
    images, targets = next(iter(loader))
    assert images.shape == (4, 3, 64, 64) and len(targets) == 4
    assert torch.equal(targets[2]["boxes"], scenes.targets(2)["boxes"])
