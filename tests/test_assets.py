"""The ``stopchurn://`` asset URI scheme: built, parsed and normalized one way, and registered with Airflow."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from airflow_provider_stopchurn.assets import (
    DEFAULT_HOST,
    TableRef,
    asset_uri,
    openlineage_name,
    parse_asset_uri,
    sanitize_uri,
)

CANONICAL = "stopchurn://marketplace.stopchurn.com/1/user"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((1, "user"), CANONICAL),
        (("1", "user", "marketplace.stopchurn.com"), CANONICAL),
        ((" 001 ", "user", "https://marketplace.stopchurn.com"), CANONICAL),
        ((1, "user", "https://Marketplace.StopChurn.com:443/"), CANONICAL),
        ((1, "user", "MARKETPLACE.STOPCHURN.COM."), CANONICAL),
        (
            (7, "userSegment", "https://marketplace-staging.stopchurn.com"),
            "stopchurn://marketplace-staging.stopchurn.com/7/userSegment",
        ),
        ((7, "account", "127.0.0.1:8765"), "stopchurn://127.0.0.1:8765/7/account"),
        ((7, "account", "http://[::1]:8765"), "stopchurn://[::1]:8765/7/account"),
        ((2, "user segment/v2"), "stopchurn://marketplace.stopchurn.com/2/user%20segment%2Fv2"),
        ((2, "100%"), "stopchurn://marketplace.stopchurn.com/2/100%25"),
    ],
)
def test_asset_uri(args: tuple[object, ...], expected: str) -> None:
    uri = asset_uri(*args)  # type: ignore[arg-type]
    assert uri == expected
    assert sanitize_uri(urlsplit(uri)).geturl() == uri  # already normal
    ref = parse_asset_uri(uri)
    assert ref is not None and asset_uri(ref.brand_id, ref.table_name, ref.host) == uri  # round trip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, "user"), "brand id is an integer >= 1"),
        ((-1, "user"), "brand id is an integer >= 1"),
        (("abc", "user"), "brand id is an integer >= 1"),
        ((True, "user"), "brand id is an integer >= 1"),
        ((1.5, "user"), "brand id is an integer >= 1"),
        ((1, ""), "table name is a non-empty string"),
        ((1, "user", "https://user:secret@marketplace.stopchurn.com"), "no credentials"),
        ((1, "user", "https://marketplace.stopchurn.com/api"), "host name"),
        ((1, "user", "marketplace.stopchurn.com:http"), "Invalid port"),
    ],
)
def test_asset_uri_refuses(args: tuple[object, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        asset_uri(*args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "spelling",
    [
        "stopchurn://marketplace.stopchurn.com/1/user/",
        "stopchurn://Marketplace.StopChurn.com:443/01/user",
    ],
)
def test_sanitize_uri_gives_one_spelling(spelling: str) -> None:
    assert sanitize_uri(urlsplit(spelling)).geturl() == CANONICAL


@pytest.mark.parametrize(
    "uri",
    [
        "stopchurn:///1/user",  # no host
        "stopchurn://marketplace.stopchurn.com/user",  # no brand
        "stopchurn://marketplace.stopchurn.com/1/user/extra",
        "stopchurn://marketplace.stopchurn.com/x/user",
        "stopchurn://marketplace.stopchurn.com/1/user?v=2",
        "stopchurn://marketplace.stopchurn.com//1//user",
    ],
)
def test_malformed_uris(uri: str) -> None:
    assert parse_asset_uri(uri) is None
    with pytest.raises(ValueError):
        sanitize_uri(urlsplit(uri))


def test_parse_and_openlineage_name() -> None:
    assert parse_asset_uri("postgres://db:5432/app/public/users") is None
    ref = parse_asset_uri("stopchurn://marketplace.stopchurn.com/3/user%20segment")
    assert ref == TableRef(DEFAULT_HOST, 3, "user segment")
    assert openlineage_name(ref) == ("stopchurn://marketplace.stopchurn.com", "3/user segment")


# --- in Airflow ------------------------------------------------------------------------------------------------
def test_airflow_registers_the_scheme() -> None:
    from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

    from airflow_provider_stopchurn.hooks.assets import convert_asset_to_openlineage, create_asset

    pm = ProvidersManagerTaskRuntime()
    assert pm.asset_uri_handlers["stopchurn"] is sanitize_uri
    assert pm.asset_factories["stopchurn"] is create_asset
    assert pm.asset_to_openlineage_converters["stopchurn"] is convert_asset_to_openlineage


def test_airflow_normalizes_stopchurn_assets() -> None:
    from airflow.sdk import Asset

    from airflow_provider_stopchurn.hooks.assets import stopchurn_asset

    assert Asset("STOPCHURN://Marketplace.StopChurn.com:443/01/user/").uri == CANONICAL
    assert stopchurn_asset(1, "user") == Asset(CANONICAL)  # one asset, however it is written
    assert stopchurn_asset(1, "user", host="https://marketplace-staging.stopchurn.com") != Asset(CANONICAL)
    with pytest.raises(ValueError, match="brand"):
        Asset("stopchurn://marketplace.stopchurn.com/not-a-brand/user")


def test_factory_and_openlineage_converter() -> None:
    from airflow.providers.openlineage.utils.utils import translate_airflow_asset

    from airflow_provider_stopchurn.hooks.assets import convert_asset_to_openlineage, create_asset

    asset = create_asset(brand_id=4, table_name="userSegment", host="marketplace-staging.stopchurn.com")
    assert asset.uri == "stopchurn://marketplace-staging.stopchurn.com/4/userSegment"
    dataset = convert_asset_to_openlineage(asset)
    assert (dataset.namespace, dataset.name) == ("stopchurn://marketplace-staging.stopchurn.com", "4/userSegment")
    translated = translate_airflow_asset(asset, None)  # what OpenLineage does with a task's inlets and outlets
    assert translated is not None and (translated.namespace, translated.name) == (dataset.namespace, dataset.name)
