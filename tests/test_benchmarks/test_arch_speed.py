"""benchmarks/arch_speed.py, shrunk: one row per network through the trainer `fit` uses."""

import pytest

from benchmarks import arch_speed


def test_arch_speed_prints_a_row_per_network_with_augmentation(capsys):
    arch_speed.main(["--net", "resnet:width=0.25", "--net", "cnn", "--images", "64", "--warmup", "64",
                     "--repeats", "1", "--batch-size", "32", "--augment", "--threads", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert "augment=True" in lines[0] and "avx2=" in lines[0]  # the CPU flags beside every figure
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert set(rows) == {"resnet:width=0.25", "cnn"}
    assert rows["cnn"][0] == "2,452,999" and float(rows["cnn"][1]) == pytest.approx(175.9, abs=0.1)
    assert all(float(r[2]) > 0 and float(r[4]) > 0 for r in rows.values())  # img/s, minutes an epoch


@pytest.mark.parametrize("net", ["vgg:width", "vgg:width=3", "nosuch"])
def test_arch_speed_refuses_a_bad_net_in_one_line(net, capsys):
    with pytest.raises(SystemExit) as e:
        arch_speed.main(["--net", net])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
