from muse.cli import main


def test_show_config_prints_the_resolved_tree(capsys):
    assert main(["show-config", "--config", "digits", "method=nayer"]) == 0
    out = capsys.readouterr().out
    assert "method: nayer" in out and "kr: 0.0" in out


def test_bad_config_exits_2_with_the_field_named(capsys):
    assert main(["distill", "--config", "digits", "loss.nope=1"]) == 2
    assert "loss.nope: unknown field" in capsys.readouterr().err
