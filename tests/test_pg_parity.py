"""The KMS test suite, run again over the PostgreSQL store.

The tests below are the SQLite store's own (imported from their modules, unchanged); collected
here, they get this module's ``service`` fixture, which opens the KMS over a fresh PostgreSQL
database (``KMSENV_STORE``, so a test that opens a second service on its home reaches the same
database). Tests that read SQLite's files directly stay SQLite-only; their PostgreSQL
counterparts are in ``test_pg_store.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import FakeClock
from kmsenv.kms.service import KmsService, open_service
from pg_harness import pg_cluster, pg_url, pg_url_factory

# -- the suite, as the SQLite store runs it ---------------------------------------------------
from test_kms_aliases import (
    names,
    test_alias_listing_pages_and_per_key,
    test_alias_name_limits_accepted,
    test_create_alias_and_list,
    test_delete_alias_keeps_the_key,
    test_every_keyed_action_accepts_every_name_form,
    test_foreign_and_malformed_arns,
    test_name_forms_in_other_key_parameters,
    test_update_alias_moves_it,
    test_update_and_delete_unknown_alias,
)
from test_kms_crypto import (
    test_context_compared_as_a_map,
    test_dry_run_checks_everything_and_uses_no_key,
    test_encrypt_decrypt_round_trip,
    test_generate_data_key_sizes,
    test_generate_data_key_without_plaintext,
    test_re_encrypt,
    test_re_encrypt_errors,
    test_relabelled_blob_fails,
    test_wrong_context_is_invalid_ciphertext,
)
from test_kms_deletion import (
    test_cancel_deletion_of_key_without_material_returns_to_pending_import,
    test_cancel_key_deletion_restores_enabled,
    test_schedule_key_deletion_needs_a_window,
    test_schedule_key_deletion_window,
    test_unknown_key_message_does_not_claim_deletion,
)
from test_kms_keys import (
    test_create_external_key_is_pending_import,
    test_create_key_accepts_every_documented_parameter,
    test_create_key_defaults_and_metadata_shape,
    test_create_key_rotation_defaults_to_one_year,
    test_describe_key_unknown_and_missing,
    test_disable_and_enable_key,
    test_list_keys_filters,
    test_list_keys_pages_and_totals,
    test_rotation_shows_suspended_while_disabled,
    test_set_deletion_protection,
    test_update_key_description,
)
from test_kms_params import test_empty_typed_values_count_as_absent, test_typed_methods_take_python_values
from test_kms_state_table import test_state_error_names_action_and_state
from test_kms_versions_rotation import (
    test_automatic_rotation_when_due,
    test_create_key_version,
    test_describe_and_list_key_versions,
    test_no_rotation_while_disabled_or_turned_off,
    test_rotation_interval_change_reschedules_from_last_rotation,
    test_rotation_is_done_once_by_whichever_service_calls,
    test_update_rotation_policy_on_and_off,
)

__all__ = [
    "names",
    "pg_cluster",
    "pg_url",
    "pg_url_factory",
    "test_alias_listing_pages_and_per_key",
    "test_alias_name_limits_accepted",
    "test_automatic_rotation_when_due",
    "test_cancel_deletion_of_key_without_material_returns_to_pending_import",
    "test_cancel_key_deletion_restores_enabled",
    "test_context_compared_as_a_map",
    "test_create_alias_and_list",
    "test_create_external_key_is_pending_import",
    "test_create_key_accepts_every_documented_parameter",
    "test_create_key_defaults_and_metadata_shape",
    "test_create_key_rotation_defaults_to_one_year",
    "test_create_key_version",
    "test_delete_alias_keeps_the_key",
    "test_describe_and_list_key_versions",
    "test_describe_key_unknown_and_missing",
    "test_disable_and_enable_key",
    "test_dry_run_checks_everything_and_uses_no_key",
    "test_empty_typed_values_count_as_absent",
    "test_encrypt_decrypt_round_trip",
    "test_every_keyed_action_accepts_every_name_form",
    "test_foreign_and_malformed_arns",
    "test_generate_data_key_sizes",
    "test_generate_data_key_without_plaintext",
    "test_list_keys_filters",
    "test_list_keys_pages_and_totals",
    "test_name_forms_in_other_key_parameters",
    "test_no_rotation_while_disabled_or_turned_off",
    "test_re_encrypt",
    "test_re_encrypt_errors",
    "test_relabelled_blob_fails",
    "test_rotation_interval_change_reschedules_from_last_rotation",
    "test_rotation_is_done_once_by_whichever_service_calls",
    "test_rotation_shows_suspended_while_disabled",
    "test_schedule_key_deletion_needs_a_window",
    "test_schedule_key_deletion_window",
    "test_set_deletion_protection",
    "test_state_error_names_action_and_state",
    "test_typed_methods_take_python_values",
    "test_unknown_key_message_does_not_claim_deletion",
    "test_update_alias_moves_it",
    "test_update_and_delete_unknown_alias",
    "test_update_key_description",
    "test_update_rotation_policy_on_and_off",
    "test_wrong_context_is_invalid_ciphertext",
]


@pytest.fixture
def service(kms_home: Path, clock: FakeClock, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[KmsService]:
    """This module's override of conftest's ``service``: the KMS over a new PostgreSQL database."""
    monkeypatch.setenv("KMSENV_STORE", pg_url)
    svc = open_service(kms_home, clock=clock, announce=False)
    assert svc.store.path == pg_url  # no password in the test URLs: nothing redacted
    yield svc
    svc.close()
