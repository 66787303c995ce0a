"""A namespace with a trailing newline is refused (a `$`-anchored match let "ns\\n" through)."""

import grpc
import pytest

from kvstore.client import KVStoreError
from service_daemon import daemon_and_client, key


@pytest.mark.parametrize("namespace", ["ns\n", "ns\r\n", "\nns"])
def test_namespace_with_a_newline_is_invalid_argument(namespace):
    with daemon_and_client() as (_, client):
        with pytest.raises(KVStoreError) as info:
            client.lookup(namespace, [key(1)])
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details == "namespace: only letters, digits and . _ : - are allowed"
