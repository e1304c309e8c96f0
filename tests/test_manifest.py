"""Manifest schema: round trip, path resolution, and errors that name the line and column."""

import numpy as np
import pandas as pd
import pytest

from shared_models.manifest import (
    MANIFEST_COLUMNS,
    ManifestError,
    label_mask,
    read_manifest,
    validate_manifest,
    write_manifest,
)

HEADER = ",".join(MANIFEST_COLUMNS)


def frame():
    return pd.DataFrame({
        "path": ["/data/a.wav", "/data/b.wav", "/data/c.wav"],
        "speaker": ["s1", "s1", "s2"],
        "gender": ["female", "", "male"],
        "emotion": ["anger", "", ""],
        "arousal": [0.5, np.nan, -1.0],
        "valence": [-0.25, np.nan, 0.0],
        "duration": [1.5, 2.0, np.nan],
        "age": ["31", "", "60"],
    })


def test_round_trip(tmp_path):
    out = write_manifest(frame(), tmp_path / "sub" / "m.csv")
    assert out.read_text().splitlines()[0] == HEADER + ",age"
    back = read_manifest(out)
    pd.testing.assert_frame_equal(back, validate_manifest(frame()))
    assert back["arousal"].dtype == np.float64 and back.loc[1, "emotion"] == ""
    assert label_mask(back)["emotion"].tolist() == [True, False, False]
    assert label_mask(back)["av"].tolist() == [True, False, True]


def test_relative_paths_resolved_against_manifest_folder(tmp_path):
    (tmp_path / "corpus").mkdir()
    path = tmp_path / "corpus" / "m.csv"
    path.write_text(f"{HEADER}\nclips/a.wav,s1,,,,,\n/abs/b.wav,s1,,,,,\n")
    df = read_manifest(path)
    assert df["path"].tolist() == [str(tmp_path / "corpus" / "clips" / "a.wav"), "/abs/b.wav"]


@pytest.mark.parametrize(
    "row3,column",
    [
        ("b.wav,s1,,angryy,,,", "emotion"),
        ("b.wav,s1,,,1.5,0,", "arousal"),
        ("b.wav,s1,,,0,high,", "valence"),
        ("b.wav,s1,other,,,,", "gender"),
        ("b.wav,,,,,,", "speaker"),
        ("b.wav,s1,,,,,-2", "duration"),
    ],
)
def test_errors_name_line_and_column(tmp_path, row3, column):
    path = tmp_path / "m.csv"
    path.write_text(f"{HEADER}\na.wav,s1,male,anger,0.1,0.2,1.0\n{row3}\n")
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    msg = str(info.value)
    assert "line 3" in msg and f"column {column}" in msg and str(path) in msg


def test_missing_column_named(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("path,speaker,gender,emotion,arousal,duration\na.wav,s1,,,,\n")
    with pytest.raises(ManifestError, match="missing column.*valence"):
        read_manifest(path)


def test_out_of_range_arousal_refused_on_write(tmp_path):
    df = frame()
    df.loc[2, "arousal"] = 1.2
    with pytest.raises(ManifestError, match="line 4, column arousal"):
        write_manifest(df, tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        read_manifest(tmp_path / "nope.csv")


def test_pandas_missing_values_are_empty_not_the_text_na():
    from shared_models.manifest import validate_manifest

    df = pd.DataFrame({"path": ["a.wav", "b.wav"], "speaker": ["s1", "s2"], "gender": ["female", None],
                       "emotion": ["anger", None], "arousal": [0.1, None], "valence": [0.2, None],
                       "duration": [1.0, 2.0]}).convert_dtypes()  # pd.NA, as read_csv(dtype="string") gives
    out = validate_manifest(df)
    assert out["gender"].tolist() == ["female", ""] and out["emotion"].tolist() == ["anger", ""]
