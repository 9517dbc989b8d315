#!/usr/bin/env python3
"""A second, independent PKCS#11 client (plain ctypes, no hsmca code): tries to read the
secret value of a private key.

    pkcs11_read_value.py MODULE TOKEN_LABEL PIN KEY_LABEL
    pkcs11_read_value.py --create-readable-ec-key MODULE TOKEN_LABEL PIN KEY_LABEL

Logs in to the token labelled TOKEN_LABEL, finds the private key labelled KEY_LABEL and asks
C_GetAttributeValue for CKA_VALUE (EC) or CKA_PRIVATE_EXPONENT (RSA). As a control it also
reads a public attribute of the key's public key object, so a failure to read the secret is
known to come from the token, not from this script.

Prints one line per attribute, `NAME ok LENGTH` or `NAME rv 0x..`, and exits:
  0  the secret value was read (the key is NOT protected)
  3  the token refused the secret value (CKR_ATTRIBUTE_SENSITIVE and friends)
  4  anything else went wrong (usage, login, key not found, control read failed)

With --create-readable-ec-key it instead creates a deliberately unprotected P-256 key pair
(CKA_SENSITIVE false, CKA_EXTRACTABLE true, private scalar 1, so the public point is the
generator): the control that shows this reader does read a secret value when the token lets
it, and a key that a CA must refuse.
"""

import ctypes
import sys

CK_ULONG = ctypes.c_ulong
CK_RV = CK_ULONG
CKR_OK = 0x0
CKR_ATTRIBUTE_SENSITIVE = 0x11
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191
CKR_USER_ALREADY_LOGGED_IN = 0x100
CKF_SERIAL_SESSION = 0x4
CKF_RW_SESSION = 0x2
CKU_USER = 1
CKA_CLASS = 0x0
CKA_TOKEN = 0x1
CKA_PRIVATE = 0x2
CKA_LABEL = 0x3
CKA_VALUE = 0x11
CKA_KEY_TYPE = 0x100
CKA_ID = 0x102
CKA_MODULUS = 0x120
CKA_PRIVATE_EXPONENT = 0x123
CKA_SENSITIVE = 0x103
CKA_SIGN = 0x108
CKA_VERIFY = 0x10A
CKA_EXTRACTABLE = 0x162
CKA_EC_PARAMS = 0x180
CKA_EC_POINT = 0x181
CKO_PUBLIC_KEY = 2
CKO_PRIVATE_KEY = 3
CKK_RSA = 0
CKK_EC = 3
UNAVAILABLE = CK_ULONG(-1).value  # CK_UNAVAILABLE_INFORMATION


class CK_ATTRIBUTE(ctypes.Structure):
    _fields_ = [
        ("type", CK_ULONG),
        ("pValue", ctypes.c_void_p),
        ("ulValueLen", CK_ULONG),
    ]


def fail(msg):
    print(msg, file=sys.stderr)
    sys.exit(4)


def check(name, rv, ok=(CKR_OK,)):
    if rv not in ok:
        fail(f"{name} failed: rv 0x{rv:x}")


P256_OID_DER = bytes.fromhex("06082a8648ce3d030107")
P256_G = bytes.fromhex(
    "04"
    "6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296"
    "4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5"
)


def main():
    args = sys.argv[1:]
    create = bool(args) and args[0] == "--create-readable-ec-key"
    if create:
        args = args[1:]
    if len(args) != 4:
        fail(__doc__)
    module, token_label, pin, key_label = args
    lib = ctypes.CDLL(module)
    for fn in ("C_Initialize", "C_GetSlotList", "C_GetTokenInfo", "C_OpenSession", "C_Login",
               "C_FindObjectsInit", "C_FindObjects", "C_FindObjectsFinal",
               "C_GetAttributeValue", "C_CreateObject"):
        getattr(lib, fn).restype = CK_RV

    check("C_Initialize", lib.C_Initialize(None), (CKR_OK, CKR_CRYPTOKI_ALREADY_INITIALIZED))

    count = CK_ULONG(0)
    check("C_GetSlotList", lib.C_GetSlotList(ctypes.c_ubyte(1), None, ctypes.byref(count)))
    slots = (CK_ULONG * count.value)()
    check("C_GetSlotList", lib.C_GetSlotList(ctypes.c_ubyte(1), slots, ctypes.byref(count)))
    slot = None
    for s in slots[: count.value]:
        info = ctypes.create_string_buffer(4096)  # CK_TOKEN_INFO starts with label[32]
        if lib.C_GetTokenInfo(CK_ULONG(s), info) != CKR_OK:
            continue
        if info.raw[:32].decode("utf-8", "replace").rstrip() == token_label:
            slot = s
            break
    if slot is None:
        fail(f"no token labelled {token_label!r}")

    session = CK_ULONG(0)
    flags = CKF_SERIAL_SESSION | (CKF_RW_SESSION if create else 0)
    check("C_OpenSession", lib.C_OpenSession(CK_ULONG(slot), CK_ULONG(flags),
                                             None, None, ctypes.byref(session)))
    pin_bytes = pin.encode()
    check("C_Login", lib.C_Login(session, CK_ULONG(CKU_USER), ctypes.c_char_p(pin_bytes),
                                 CK_ULONG(len(pin_bytes))),
          (CKR_OK, CKR_USER_ALREADY_LOGGED_IN))

    def find(klass, attr_type, value):
        cls = CK_ULONG(klass)
        buf = ctypes.create_string_buffer(value, len(value))
        template = (CK_ATTRIBUTE * 2)(
            CK_ATTRIBUTE(CKA_CLASS, ctypes.cast(ctypes.byref(cls), ctypes.c_void_p),
                         ctypes.sizeof(cls)),
            CK_ATTRIBUTE(attr_type, ctypes.cast(buf, ctypes.c_void_p), len(value)),
        )
        check("C_FindObjectsInit", lib.C_FindObjectsInit(session, template, CK_ULONG(2)))
        handles = (CK_ULONG * 16)()
        n = CK_ULONG(0)
        check("C_FindObjects", lib.C_FindObjects(session, handles, CK_ULONG(16), ctypes.byref(n)))
        check("C_FindObjectsFinal", lib.C_FindObjectsFinal(session))
        return list(handles[: n.value])

    def read(handle, attr_type):
        """Returns (rv, bytes or None)."""
        attr = CK_ATTRIBUTE(attr_type, None, 0)
        rv = lib.C_GetAttributeValue(session, CK_ULONG(handle), ctypes.byref(attr), CK_ULONG(1))
        if rv != CKR_OK or attr.ulValueLen == UNAVAILABLE:
            return rv if rv != CKR_OK else CKR_ATTRIBUTE_SENSITIVE, None
        buf = ctypes.create_string_buffer(attr.ulValueLen)
        attr.pValue = ctypes.cast(buf, ctypes.c_void_p)
        rv = lib.C_GetAttributeValue(session, CK_ULONG(handle), ctypes.byref(attr), CK_ULONG(1))
        if rv != CKR_OK:
            return rv, None
        return rv, buf.raw[: attr.ulValueLen]

    if create:
        create_readable_ec_key(lib, session, key_label.encode())
        print(f"created readable P-256 key {key_label!r}")
        sys.exit(0)

    keys = find(CKO_PRIVATE_KEY, CKA_LABEL, key_label.encode())
    if len(keys) != 1:
        fail(f"{len(keys)} private keys labelled {key_label!r}")
    key = keys[0]
    rv, key_type = read(key, CKA_KEY_TYPE)
    check("C_GetAttributeValue(CKA_KEY_TYPE)", rv)
    key_type = int.from_bytes(key_type, sys.byteorder)
    rv, key_id = read(key, CKA_ID)
    check("C_GetAttributeValue(CKA_ID)", rv)

    # Control: the public half is readable through this very client.
    pubs = find(CKO_PUBLIC_KEY, CKA_ID, key_id)
    if not pubs:
        fail("no public key object with the private key's CKA_ID")
    public_attr = ("CKA_MODULUS", CKA_MODULUS) if key_type == CKK_RSA else ("CKA_EC_POINT", CKA_EC_POINT)
    rv, value = read(pubs[0], public_attr[1])
    if rv != CKR_OK:
        fail(f"control read of the public key's {public_attr[0]} failed: rv 0x{rv:x}")
    print(f"public {public_attr[0]} ok {len(value)}")

    secret_attr = ("CKA_PRIVATE_EXPONENT", CKA_PRIVATE_EXPONENT) if key_type == CKK_RSA else ("CKA_VALUE", CKA_VALUE)
    rv, value = read(key, secret_attr[1])
    if rv == CKR_OK and value:
        print(f"private {secret_attr[0]} ok {len(value)}")
        sys.exit(0)
    print(f"private {secret_attr[0]} rv 0x{rv:x}")
    sys.exit(3)


def create_readable_ec_key(lib, session, label):
    keep = []  # buffers must outlive the call

    def attr(attr_type, value):
        if isinstance(value, bool):
            value = bytes([1 if value else 0])
        elif isinstance(value, int):
            value = value.to_bytes(ctypes.sizeof(CK_ULONG), sys.byteorder)
        buf = ctypes.create_string_buffer(value, len(value))
        keep.append(buf)
        return CK_ATTRIBUTE(attr_type, ctypes.cast(buf, ctypes.c_void_p), len(value))

    key_id = b"readable-" + label
    # CKA_EC_POINT is the DER OCTET STRING around the uncompressed point.
    ec_point = bytes([0x04, len(P256_G)]) + P256_G
    public = [
        attr(CKA_CLASS, CKO_PUBLIC_KEY), attr(CKA_KEY_TYPE, CKK_EC), attr(CKA_TOKEN, True),
        attr(CKA_PRIVATE, False), attr(CKA_VERIFY, True), attr(CKA_LABEL, label),
        attr(CKA_ID, key_id), attr(CKA_EC_PARAMS, P256_OID_DER), attr(CKA_EC_POINT, ec_point),
    ]
    private = [
        attr(CKA_CLASS, CKO_PRIVATE_KEY), attr(CKA_KEY_TYPE, CKK_EC), attr(CKA_TOKEN, True),
        attr(CKA_PRIVATE, True), attr(CKA_SENSITIVE, False), attr(CKA_EXTRACTABLE, True),
        attr(CKA_SIGN, True), attr(CKA_LABEL, label), attr(CKA_ID, key_id),
        attr(CKA_EC_PARAMS, P256_OID_DER), attr(CKA_VALUE, (1).to_bytes(32, "big")),
    ]
    for name, template in (("public", public), ("private", private)):
        arr = (CK_ATTRIBUTE * len(template))(*template)
        handle = CK_ULONG(0)
        check(f"C_CreateObject({name})",
              lib.C_CreateObject(session, arr, CK_ULONG(len(template)), ctypes.byref(handle)))


if __name__ == "__main__":
    main()
