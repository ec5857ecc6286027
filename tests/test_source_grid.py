from lowbit.eval.source_grid import artifact_contains_source_grid, contains_source_grid, parse_source_format


def test_q4_1_source_is_contained_only_by_asymmetric_4plus_bits_in_its_blocks():
    src = "gguf Q4_1"
    assert parse_source_format(src).block == 32
    assert contains_source_grid(src, "int4", False, 32)
    assert contains_source_grid(src, "int5", False, 16)
    assert contains_source_grid(src, "int8", False, 32)
    assert not contains_source_grid(src, "int4", True, 32)  # no zero point: cannot hold an offset grid
    assert not contains_source_grid(src, "int4", False, 64)  # a group spans two source blocks
    assert not contains_source_grid(src, "int4", False, 128)
    assert not contains_source_grid(src, "int3", False, 32)
    assert not contains_source_grid(src, "int4", False, -1)


def test_symmetric_sources_and_unknown_sources():
    assert contains_source_grid("gguf Q8_0", "int8", True, 32)
    assert not contains_source_grid("gguf Q8_0", "int4", False, 32)
    assert not contains_source_grid(None, "int4", False, 32)
    assert not contains_source_grid("gguf Q4_K", "int4", False, 32)  # not modelled: never claimed


def test_artifact_flag():
    header = {"source": {"source_format": "gguf Q4_1"}, "modules": {
        "a": {"grid": {"format": "int4", "symmetric": False}, "group_size": 64},
        "b": {"grid": {"format": "int4", "symmetric": False}, "group_size": 32},
    }}
    assert artifact_contains_source_grid(header)
    header["modules"].pop("b")
    assert not artifact_contains_source_grid(header)
