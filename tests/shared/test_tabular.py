"""Tests for shared.tabular: CSV reading, column validation, label coding, ClientTable."""

import ast
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared.errors import UserError
from shared.tabular import (
    MISSING_TOKENS,
    ClientTable,
    binary_labels,
    numeric_columns,
    read_csv,
    require_columns,
)

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def assert_one_line(error: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(error.value)


# --- the package boundary ---------------------------------------------------------


FORBIDDEN_PACKAGES = {"tensorflow", "tensorflow_federated", "tensorflow_privacy"}


def imported_modules(source: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
    return names


def test_shared_package_never_imports_tensorflow():
    sources = sorted(SHARED_DIR.glob("*.py"))
    assert {"tabular.py", "partition.py", "metrics.py"} <= {path.name for path in sources}
    offenders = [
        f"{source.name}: {module}"
        for source in sources
        for module in imported_modules(source)
        if module.split(".")[0] in FORBIDDEN_PACKAGES
    ]
    assert offenders == []


# --- read_csv ---------------------------------------------------------------------


def test_read_csv_keeps_cells_as_strings_and_strips_headers(tmp_path):
    path = write(tmp_path, "site.csv", " age ,sex,\tchol\n63,1,NA\n 41 ,0,?\n")
    frame = read_csv(path)
    assert list(frame.columns) == ["age", "sex", "chol"]
    # Cells are untouched strings: "NA" is not turned into NaN, whitespace is kept.
    assert frame.to_numpy().tolist() == [["63", "1", "NA"], [" 41 ", "0", "?"]]


def test_read_csv_accepts_string_path_and_utf8_bom(tmp_path):
    path = write(tmp_path, "bom.csv", "\ufeffage,y\n1,0\n")
    frame = read_csv(str(path))
    assert list(frame.columns) == ["age", "y"]


def test_read_csv_fills_short_rows_with_empty_cells_and_names_blank_headers(tmp_path):
    path = write(tmp_path, "short.csv", "a,b,\n1\n")
    frame = read_csv(path)
    assert list(frame.columns) == ["a", "b", "Unnamed: 2"]
    assert frame.to_numpy().tolist() == [["1", "", ""]]


def test_read_csv_missing_file(tmp_path):
    path = tmp_path / "absent.csv"
    with pytest.raises(UserError) as error:
        read_csv(path)
    assert str(error.value) == f"{path}: file not found"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "file is empty"),
        ("\n\n", "file is empty"),
        ("age,y\n", "has a header but no data rows"),
        ("a,b\n1,2\n3,4,5\n", "not a readable CSV file"),
        ('a,"b\n1,2\n', "not a readable CSV file"),
        (b"a,b\n\xff\xfe,1\n", "not a readable CSV file"),
    ],
)
def test_read_csv_rejects_unusable_files(tmp_path, content, expected):
    path = write(tmp_path, "bad.csv", content)
    with pytest.raises(UserError) as error:
        read_csv(path)
    assert str(error.value).startswith(f"{path}: {expected}")
    assert_one_line(error)


def test_read_csv_rejects_a_directory(tmp_path):
    with pytest.raises(UserError, match="is not a file"):
        read_csv(tmp_path)


def test_read_csv_names_a_column_duplicated_after_stripping(tmp_path):
    path = write(tmp_path, "dup.csv", "age, sex,y,sex \n1,2,3,4\n")
    with pytest.raises(UserError) as error:
        read_csv(path)
    assert str(error.value).startswith(f"{path}: column 'sex' appears more than once")


# --- require_columns --------------------------------------------------------------


def test_require_columns_names_the_first_missing_column_and_those_present():
    frame = pd.DataFrame({"a": [1], "b": [2], "c": [3]})
    require_columns(frame, ["c", "a"], "site.csv")  # all present: no error
    with pytest.raises(UserError) as error:
        require_columns(frame, ["a", "x", "y"], "site.csv")
    assert str(error.value) == "site.csv: column 'x' is missing; the file has columns a, b, c"


# --- numeric_columns --------------------------------------------------------------


def test_numeric_columns_parses_orders_and_marks_missing():
    frame = pd.DataFrame(
        {"y": ["0", "1", "0"], "age": [" 63", "4.5e1", "NA"], "chol": ["0", "", "212"]}
    )
    result = numeric_columns(frame, ["chol", "age"], "site.csv", zero_means_missing=["chol"])
    assert list(result.columns) == ["chol", "age"]
    assert all(result.dtypes == np.float64)
    np.testing.assert_array_equal(result["age"], [63.0, 45.0, np.nan])
    np.testing.assert_array_equal(result["chol"], [np.nan, np.nan, 212.0])
    assert frame["chol"].tolist() == ["0", "", "212"]  # the input is not modified


def test_numeric_columns_keeps_zero_in_columns_not_listed_as_zero_means_missing():
    frame = pd.DataFrame({"sex": ["0", "1"], "chol": ["0", "1"]})
    result = numeric_columns(frame, ["sex", "chol"], "s", zero_means_missing=["chol"])
    np.testing.assert_array_equal(result["sex"], [0.0, 1.0])
    np.testing.assert_array_equal(result["chol"], [np.nan, 1.0])


@pytest.mark.parametrize("token", MISSING_TOKENS)
def test_numeric_columns_reads_every_missing_token_as_nan(token):
    frame = pd.DataFrame({"x": ["1", f" {token} "]})
    result = numeric_columns(frame, ["x"], "s")
    assert result["x"].iloc[0] == 1.0
    assert np.isnan(result["x"].iloc[1])


def test_numeric_columns_reports_the_first_bad_cell_with_its_data_row():
    frame = pd.DataFrame({"age": ["1", "2", "", "4", "5", "6", " abc ", "zz"]})
    with pytest.raises(UserError) as error:
        numeric_columns(frame, ["age"], "site.csv")
    assert str(error.value) == (
        "site.csv: column 'age' is not numeric (row 7 has 'abc'); "
        "give numbers, or leave the cell empty for missing"
    )


def test_numeric_columns_error_stays_on_one_line_for_a_multiline_cell():
    frame = pd.DataFrame({"age": ["1", "ab\ncd"]})
    with pytest.raises(UserError, match=r"row 2 has 'ab cd'") as error:
        numeric_columns(frame, ["age"], "s")
    assert_one_line(error)


def test_numeric_columns_accepts_frames_that_already_hold_numbers():
    frame = pd.DataFrame(
        {
            "ints": [1, 0, 3],
            "floats": [0.5, np.nan, 2.0],
            "nullable": pd.array([1, None, 0], dtype="Int64"),
            "mixed": [1, None, "2"],
        }
    )
    result = numeric_columns(frame, list(frame.columns), "s", zero_means_missing=["ints"])
    np.testing.assert_array_equal(result["ints"], [1.0, np.nan, 3.0])
    np.testing.assert_array_equal(result["floats"], [0.5, np.nan, 2.0])
    np.testing.assert_array_equal(result["nullable"], [1.0, np.nan, 0.0])
    np.testing.assert_array_equal(result["mixed"], [1.0, np.nan, 2.0])


@pytest.mark.parametrize("values", [[1.0, np.inf], ["1", "-inf"]])
def test_numeric_columns_rejects_infinity(values):
    with pytest.raises(UserError, match=r"column 'x' is not numeric \(row 2 has '-?inf'\)"):
        numeric_columns(pd.DataFrame({"x": values}), ["x"], "s")


def test_numeric_columns_reports_a_missing_column_before_parsing():
    frame = pd.DataFrame({"age": ["abc"]})
    with pytest.raises(UserError, match="column 'chol' is missing; the file has columns age"):
        numeric_columns(frame, ["age", "chol"], "s")


def test_numeric_columns_zero_means_missing_must_name_selected_columns():
    with pytest.raises(ValueError, match="chol"):
        numeric_columns(pd.DataFrame({"age": ["1"]}), ["age"], "s", zero_means_missing=["chol"])


# --- binary_labels ----------------------------------------------------------------


def test_binary_labels_compares_strings_and_numbers():
    values = pd.Series(["0", "1.0", " 1 ", "2", "4", "01"])
    labels = binary_labels(values, "1", "heart.csv", "num")
    assert labels.dtype == np.int64
    assert labels.tolist() == [0, 1, 1, 0, 0, 1]


def test_binary_labels_with_text_labels_and_numeric_series():
    assert binary_labels(pd.Series(["bad", "good", "bad "]), "bad", "s", "y").tolist() == [1, 0, 1]
    assert binary_labels(pd.Series([0.0, 1.0, 2.0]), "1", "s", "y").tolist() == [0, 1, 0]
    assert binary_labels(pd.Series([3, 1, 3]), "3", "s", "y").tolist() == [1, 0, 1]


def test_binary_labels_ignores_the_series_index():
    values = pd.Series(["1", "0"], index=[10, 20])
    assert binary_labels(values, "1", "s", "y").tolist() == [1, 0]


def test_binary_labels_rejects_missing_labels_naming_column_and_row():
    with pytest.raises(UserError) as error:
        binary_labels(pd.Series(["1", "0", "NA", ""]), "1", "site.csv", "target")
    message = str(error.value)
    assert message.startswith("site.csv: label column 'target' is empty at row 3;")


def test_binary_labels_rejects_a_positive_label_that_never_occurs():
    with pytest.raises(UserError) as error:
        binary_labels(pd.Series(["3", "0", "2", "0"]), "1", "site.csv", "y")
    assert str(error.value) == (
        "site.csv: label column 'y' has no value equal to the positive label '1' "
        "(values seen: 0, 2, 3)"
    )


def test_binary_labels_abbreviates_many_distinct_values():
    values = pd.Series([str(value) for value in range(12, 0, -1)])
    with pytest.raises(UserError) as error:
        binary_labels(values, "99", "s", "y")
    assert str(error.value).endswith("(values seen: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, ... 2 more)")


# --- ClientTable ------------------------------------------------------------------


def make_table(name: str = "cleveland") -> ClientTable:
    features = pd.DataFrame({"age": [63.0, 41.0, np.nan, 57.0], "chol": [233.0, 204.0, 0.5, -1.0]})
    return ClientTable(name=name, features=features, labels=np.array([1, 0, 0, 1]))


def test_client_table_length_and_subset():
    table = make_table()
    assert len(table) == 4
    part = table.subset(np.array([3, 1]))
    assert part.name == "cleveland"
    assert len(part) == 2
    assert part.features.index.tolist() == [0, 1]
    assert part.features["age"].tolist() == [57.0, 41.0]
    assert part.labels.tolist() == [1, 0]
    assert len(table) == 4  # the original is unchanged


def test_client_table_rejects_labels_of_the_wrong_length():
    with pytest.raises(ValueError, match="labels"):
        ClientTable("x", pd.DataFrame({"a": [1.0, 2.0]}), np.array([1]))


# A fixed digest: if this changes, fingerprints saved by earlier runs stop matching.
PINNED_FINGERPRINT = "8b5497edb1f3c7b16c74426ca4e709746e4359ba8cf1f53de3551ff8f88d3f7f"


def test_fingerprint_is_pinned_across_runs():
    assert make_table().fingerprint() == PINNED_FINGERPRINT


def test_fingerprint_ignores_index_nan_payload_and_sign_of_zero():
    table = make_table()
    other = make_table()
    other.features.index = [7, 8, 9, 10]
    other.features.loc[9, "age"] = -np.float64("nan")  # NaN with the sign bit set
    assert other.fingerprint() == table.fingerprint()
    zero = ClientTable("z", pd.DataFrame({"a": [0.0]}), np.array([1]))
    negative_zero = ClientTable("z", pd.DataFrame({"a": [-0.0]}), np.array([1]))
    assert zero.fingerprint() == negative_zero.fingerprint()


@pytest.mark.parametrize(
    "change",
    [
        lambda t: ClientTable("hungarian", t.features, t.labels),
        lambda t: ClientTable(t.name, t.features.rename(columns={"age": "AGE"}), t.labels),
        lambda t: ClientTable(t.name, t.features[["chol", "age"]], t.labels),
        lambda t: ClientTable(t.name, t.features.replace(41.0, 41.000001), t.labels),
        lambda t: ClientTable(t.name, t.features, np.array([1, 0, 1, 1])),
        lambda t: t.subset(np.array([0, 1, 2])),
    ],
    ids=["name", "column name", "column order", "value", "label", "rows"],
)
def test_fingerprint_changes_with_content(change):
    table = make_table()
    assert change(table).fingerprint() != table.fingerprint()


def test_fingerprint_separates_name_from_column_names():
    # Without length prefixes "ab" + "c" and "a" + "bc" would hash the same bytes.
    first = ClientTable("ab", pd.DataFrame({"c": [1.0]}), np.array([0]))
    second = ClientTable("a", pd.DataFrame({"bc": [1.0]}), np.array([0]))
    assert first.fingerprint() != second.fingerprint()
