"""Mechanism parameter layouts hashim must deep-copy (pointer fields) or rewrite
(object handles), as data. A mechanism not listed here has a flat parameter
(no pointers inside), copied as bytes.

Each entry: mechanism -> (C struct, ((pointer field, length field), ...)).
A length field of ``None`` means "the pointed-to struct" (nested parameters)."""
from __future__ import annotations

from .constants import CKM

_POINTER_PARAMS = {
    "CK_RSA_PKCS_OAEP_PARAMS": (("pSourceData", "ulSourceDataLen"),),
    "CK_GCM_PARAMS": (("pIv", "ulIvLen"), ("pAAD", "ulAADLen")),
    "CK_CCM_PARAMS": (("pNonce", "ulNonceLen"), ("pAAD", "ulAADLen")),
    "CK_ECDH1_DERIVE_PARAMS": (("pSharedData", "ulSharedDataLen"),
                               ("pPublicData", "ulPublicDataLen")),
    "CK_KEY_DERIVATION_STRING_DATA": (("pData", "ulLen"),),
    "CK_AES_CBC_ENCRYPT_DATA_PARAMS": (("pData", "length"),),
    "CK_DES_CBC_ENCRYPT_DATA_PARAMS": (("pData", "length"),),
    "CK_EDDSA_PARAMS": (("pContextData", "ulContextDataLen"),),
    "CK_RSA_AES_KEY_WRAP_PARAMS": (("pOAEPParams", "CK_RSA_PKCS_OAEP_PARAMS"),),
}

_BY_STRUCT = {
    "CK_RSA_PKCS_OAEP_PARAMS": ["RSA_PKCS_OAEP"],
    "CK_GCM_PARAMS": ["AES_GCM"],
    "CK_CCM_PARAMS": ["AES_CCM"],
    "CK_ECDH1_DERIVE_PARAMS": ["ECDH1_DERIVE", "ECDH1_COFACTOR_DERIVE"],
    "CK_KEY_DERIVATION_STRING_DATA": ["CONCATENATE_BASE_AND_DATA",
                                      "CONCATENATE_DATA_AND_BASE", "XOR_BASE_AND_DATA",
                                      "DES_ECB_ENCRYPT_DATA", "DES3_ECB_ENCRYPT_DATA",
                                      "AES_ECB_ENCRYPT_DATA"],
    "CK_AES_CBC_ENCRYPT_DATA_PARAMS": ["AES_CBC_ENCRYPT_DATA"],
    "CK_DES_CBC_ENCRYPT_DATA_PARAMS": ["DES_CBC_ENCRYPT_DATA", "DES3_CBC_ENCRYPT_DATA"],
    "CK_EDDSA_PARAMS": ["EDDSA"],
    "CK_RSA_AES_KEY_WRAP_PARAMS": ["RSA_AES_KEY_WRAP"],
}

# mechanism -> (struct, pointer fields)
POINTER_PARAMS: dict[int, tuple[str, tuple]] = {}
for _struct, _names in _BY_STRUCT.items():
    for _n in _names:
        if _n in CKM.__members__:
            POINTER_PARAMS[int(CKM[_n])] = (_struct, _POINTER_PARAMS[_struct])

# mechanisms whose parameter is a CK_OBJECT_HANDLE (rewritten per member)
HANDLE_PARAMS = {int(CKM.CONCATENATE_BASE_AND_KEY)}
