"""SigV4 as AWS documents it: its worked examples for S3 (header and query forms), and
botocore's own signer (moto's dependency) where the examples stop (session tokens)."""

from __future__ import annotations

import calendar
import datetime
from unittest import mock

import httpx
import pytest
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from flux_proxy.sigv4 import AwsCredentials, SigV4Signer

# AWS's example credentials and instant (S3 API reference, "Signature Version 4 examples").
EXAMPLE = AwsCredentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
EXAMPLE_TIME = calendar.timegm((2013, 5, 24, 0, 0, 0))
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def example_signer(credentials: AwsCredentials = EXAMPLE, region: str = "us-east-1") -> SigV4Signer:
    return SigV4Signer(credentials, region, clock=lambda: EXAMPLE_TIME)


def test_the_header_signature_matches_awss_get_object_example():
    request = httpx.Request(
        "GET", "https://examplebucket.s3.amazonaws.com/test.txt", headers={"Range": "bytes=0-9"}
    )
    example_signer().sign(request, payload_hash=EMPTY_SHA256)
    assert request.headers["authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )


def test_the_presigned_url_matches_awss_query_example():
    url = example_signer().presign("GET", "https://examplebucket.s3.amazonaws.com/test.txt", 86400)
    assert url == (
        "https://examplebucket.s3.amazonaws.com/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request"
        "&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
        "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
    )


TEMPORARY = Credentials(EXAMPLE.access_key_id, EXAMPLE.secret_access_key, "token/with+odd=chars")
OURS = AwsCredentials(TEMPORARY.access_key, TEMPORARY.secret_key, TEMPORARY.token)


def botocore_signed(request: AWSRequest, auth: S3SigV4Auth) -> AWSRequest:
    at = datetime.datetime(2013, 5, 24, tzinfo=datetime.UTC)
    with mock.patch("botocore.auth.get_current_datetime", return_value=at):
        auth.add_auth(request)
    return request


def test_a_put_with_a_session_token_is_signed_as_botocore_signs_it():
    url = "http://127.0.0.1:9000/bucket/a%20prefix/image.png"
    theirs = AWSRequest(
        "PUT",
        url,
        headers={"Content-Type": "image/png", "X-Amz-Meta-Flux-Proxy-Expires": "1369357200"},
        data=b"\x89PNG",
    )
    # Unsigned payload, as ours (botocore hashes the body over plain HTTP otherwise).
    auth = S3SigV4Auth(TEMPORARY, "s3", "eu-west-3")
    with mock.patch.object(auth, "payload", return_value="UNSIGNED-PAYLOAD"):
        botocore_signed(theirs, auth)
    ours = httpx.Request("PUT", url, headers=dict(theirs.headers.items()), content=b"\x89PNG")
    del ours.headers["authorization"]
    example_signer(OURS, "eu-west-3").sign(ours)
    assert ours.headers["x-amz-security-token"] == TEMPORARY.token
    assert ours.headers["authorization"] == theirs.headers["Authorization"]


def test_a_presigned_url_with_a_session_token_is_botocores():
    url = "http://127.0.0.1:9000/bucket/prefix/image.png"
    theirs = botocore_signed(
        AWSRequest("GET", url), S3SigV4QueryAuth(TEMPORARY, "s3", "eu-west-3", expires=600)
    )
    ours = example_signer(OURS, "eu-west-3").presign("GET", url, 600)
    assert httpx.URL(ours).params == httpx.URL(theirs.url).params


@pytest.mark.parametrize("seconds", [0, 604801])
def test_presigned_links_live_between_a_second_and_a_week(seconds):
    with pytest.raises(ValueError, match="604800"):
        example_signer().presign("GET", "https://b.s3.amazonaws.com/k", seconds)


def test_the_secret_is_not_in_the_credentials_repr():
    assert EXAMPLE.secret_access_key not in repr(EXAMPLE)
    assert OURS.session_token is not None and OURS.session_token not in repr(OURS)
