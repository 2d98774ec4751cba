"""Which calls the C stub may run without entering Python (native/fastpath.c), as data.

Once the engine has started an operation on a member (its *Init went through Python:
member choice, handle translation, recording for replay), the engine publishes a
*route* for (virtual session, operation kind): the member's function list and session.
The calls below then go from the application straight to that member. Anything
unusual — no route, a NULL pointer, a device-level answer — takes the Python path,
which applies the full rules (argument errors, failover, replay)."""

# operation kinds, in the order of the C route table
KINDS = ("encrypt", "decrypt", "digest", "sign", "verify", "signrecover", "verifyrecover",
         "random")

# function -> (kind, shape); shapes:
#   single: (in, in_len, out, out_len_ptr)  ends unless length query / BUFFER_TOO_SMALL
#   update_out: (in, in_len, out, out_len_ptr)  multi-part, error ends
#   update: (in, in_len)                        multi-part, error ends
#   final: (out, out_len_ptr)                   ends unless length query / BUFFER_TOO_SMALL
#   verify: (data, data_len, sig, sig_len)      always ends
#   verify_final: (sig, sig_len)                always ends
#   random: (buf, len)                          no operation state
FAST = {
    "C_Encrypt": ("encrypt", "single"), "C_Decrypt": ("decrypt", "single"),
    "C_Digest": ("digest", "single"), "C_Sign": ("sign", "single"),
    "C_SignRecover": ("signrecover", "single"), "C_VerifyRecover": ("verifyrecover", "single"),
    "C_EncryptUpdate": ("encrypt", "update_out"), "C_DecryptUpdate": ("decrypt", "update_out"),
    "C_DigestUpdate": ("digest", "update"), "C_SignUpdate": ("sign", "update"),
    "C_VerifyUpdate": ("verify", "update"),
    "C_EncryptFinal": ("encrypt", "final"), "C_DecryptFinal": ("decrypt", "final"),
    "C_DigestFinal": ("digest", "final"), "C_SignFinal": ("sign", "final"),
    "C_Verify": ("verify", "verify"), "C_VerifyFinal": ("verify", "verify_final"),
    "C_GenerateRandom": ("random", "random"), "C_SeedRandom": ("random", "random"),
}

# *Init calls the C stub repeats by itself: when the previous operation of that kind
# on that session ended in the fast path and the application starts the same one
# again (same mechanism, a parameter without pointers and no longer than
# INIT_PARAM_MAX bytes, same key), it is started again on the same member.
INIT_FAST = {
    "C_EncryptInit": "encrypt", "C_DecryptInit": "decrypt", "C_DigestInit": "digest",
    "C_SignInit": "sign", "C_VerifyInit": "verify", "C_SignRecoverInit": "signrecover",
    "C_VerifyRecoverInit": "verifyrecover",
}
INIT_PARAM_MAX = 64

# route states (shared with C)
NONE, ACTIVE, MULTIPART, ENDED, DROPPED, DROPPED_MULTIPART, EXPIRED = 0, 1, 2, 3, 4, 5, 6
