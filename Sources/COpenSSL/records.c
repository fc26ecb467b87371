#include "COpenSSL.h"
#include <openssl/evp.h>
#include <string.h>
#include <stdlib.h>
#include <linux/tls.h>
#include <pthread.h>

// The three TLS 1.3 AEADs, fetched once: naming a built-in EVP_CIPHER makes OpenSSL 3 fetch
// its implementation again at every key set-up (a locked lookup).
static EVP_CIPHER *aes128gcm, *aes256gcm, *chacha;
static pthread_once_t ciphers_once = PTHREAD_ONCE_INIT;
static void fetch_ciphers(void) {
    aes128gcm = EVP_CIPHER_fetch(NULL, "AES-128-GCM", NULL);
    aes256gcm = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
    chacha = EVP_CIPHER_fetch(NULL, "ChaCha20-Poly1305", NULL);
}

/// The AEAD of a TLS 1.3 suite named by its kernel cipher (TLS_CIPHER_*), or NULL.
static const EVP_CIPHER *aead(int suite) {
    pthread_once(&ciphers_once, fetch_ciphers);
    switch (suite) {
    case TLS_CIPHER_AES_GCM_128: return aes128gcm;
    case TLS_CIPHER_AES_GCM_256: return aes256gcm;
    case TLS_CIPHER_CHACHA20_POLY1305: return chacha;
    default: return NULL;
    }
}

// TLS 1.3 record protection (RFC 8446 §5.2–5.3, §7.2) with a connection's application
// traffic secrets, once the handshake is over and OpenSSL's SSL object is gone.

struct igris_direction {
    EVP_CIPHER_CTX *ctx;
    unsigned char secret[64];
    unsigned char iv[12];
    unsigned long long sequence;
};

struct igris_records {
    const EVP_CIPHER *cipher;
    const char *digest;
    size_t key_length, secret_length;
    struct igris_direction seal, open;
};

/// Keys `d` from its current secret (a fresh key, IV and sequence 0).
static int key_direction(struct igris_records *r, struct igris_direction *d, int encrypt) {
    unsigned char key[32];
    int ok = igris_expand_label(r->digest, d->secret, r->secret_length, "key", key, r->key_length)
        && igris_expand_label(r->digest, d->secret, r->secret_length, "iv", d->iv, 12)
        && EVP_CipherInit_ex(d->ctx, r->cipher, NULL, key, NULL, encrypt) == 1;
    OPENSSL_cleanse(key, sizeof key);
    d->sequence = 0;
    return ok;
}

static int start_direction(struct igris_records *r, struct igris_direction *d, SSL *ssl, int sending,
                           unsigned long long sequence) {
    size_t length = 0;
    if (igris_tls13_traffic_secret(ssl, sending, d->secret, &length) != 0 || length != r->secret_length) return 0;
    d->ctx = EVP_CIPHER_CTX_new();
    if (d->ctx == NULL || !key_direction(r, d, sending)) return 0;
    d->sequence = sequence;
    return 1;
}

int igris_ssl_has_ticket(SSL *ssl) {
    SSL_SESSION *session = SSL_get0_session(ssl);
    return session != NULL && SSL_SESSION_has_ticket(session);
}

void igris_records_free(struct igris_records *r) {
    if (r == NULL) return;
    EVP_CIPHER_CTX_free(r->seal.ctx);
    EVP_CIPHER_CTX_free(r->open.ctx);
    OPENSSL_clear_free(r, sizeof *r);
}

struct igris_records *igris_records_new(SSL *ssl, unsigned long long sent, unsigned long long received) {
    const char *digest;
    size_t key_length, hash_length;
    const EVP_CIPHER *cipher = aead(igris_tls13_suite(ssl, &digest, &key_length, &hash_length));
    if (cipher == NULL) return NULL;
    struct igris_records *r = OPENSSL_zalloc(sizeof *r);
    if (r == NULL) return NULL;
    r->cipher = cipher;
    r->digest = digest;
    r->key_length = key_length;
    r->secret_length = hash_length;
    if (!start_direction(r, &r->seal, ssl, 1, sent) || !start_direction(r, &r->open, ssl, 0, received)) {
        igris_records_free(r);
        return NULL;
    }
    return r;
}

/// The record nonce: the IV with the sequence number XORed into its last 8 bytes.
static void nonce(const unsigned char iv[12], unsigned long long sequence, unsigned char out[12]) {
    memcpy(out, iv, 12);
    for (int i = 0; i < 8; i++) out[4 + i] ^= (unsigned char)(sequence >> (56 - 8 * i));
}

/// Opens one whole record with `ctx` (keyed for decryption) under `iv` and `sequence`: the
/// content's length with its type in `*type`; -1 when it does not authenticate, -2 when it
/// has no content type.
static long open_record(EVP_CIPHER_CTX *ctx, const unsigned char iv[12], unsigned long long sequence,
                        const unsigned char *record, size_t length, unsigned char *out, int *type) {
    if (length < 5 + 16 + 1 || length > 5 + IGRIS_RECORD_CIPHERTEXT) return -1;
    unsigned char n[12];
    nonce(iv, sequence, n);
    size_t body = length - 5 - 16;
    int w = 0, f = 0;
    int ok = EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, n) == 1
        && EVP_DecryptUpdate(ctx, NULL, &w, record, 5) == 1
        && EVP_DecryptUpdate(ctx, out, &w, record + 5, (int)body) == 1
        && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, 16, (void *)(record + 5 + body)) == 1
        && EVP_DecryptFinal_ex(ctx, out + w, &f) == 1;
    if (!ok) return -1;
    long plain = (long)body;
    while (plain > 0 && out[plain - 1] == 0) plain--;  // padding
    if (plain == 0) return -2;  // no content type: unexpected_message
    *type = out[plain - 1];
    return plain - 1;
}

long igris_records_seal(struct igris_records *r, int type, const unsigned char *plaintext, size_t length, unsigned char *out) {
    if (length > IGRIS_RECORD_PLAINTEXT) return -1;
    struct igris_direction *d = &r->seal;
    unsigned char n[12];
    nonce(d->iv, d->sequence, n);
    size_t body = length + 1 + 16;
    out[0] = 23; out[1] = 3; out[2] = 3; out[3] = (unsigned char)(body >> 8); out[4] = (unsigned char)body;
    unsigned char inner = (unsigned char)type;
    int w = 0, w2 = 0, f = 0;
    int ok = EVP_EncryptInit_ex(d->ctx, NULL, NULL, NULL, n) == 1
        && EVP_EncryptUpdate(d->ctx, NULL, &w, out, 5) == 1
        && (length == 0 || EVP_EncryptUpdate(d->ctx, out + 5, &w, plaintext, (int)length) == 1)
        && EVP_EncryptUpdate(d->ctx, out + 5 + length, &w2, &inner, 1) == 1
        && EVP_EncryptFinal_ex(d->ctx, out + 5 + length + 1, &f) == 1
        && EVP_CIPHER_CTX_ctrl(d->ctx, EVP_CTRL_AEAD_GET_TAG, 16, out + 5 + length + 1) == 1;
    if (!ok) return -1;
    d->sequence++;
    return (long)(5 + body);
}

long igris_records_open(struct igris_records *r, const unsigned char *record, size_t length, unsigned char *out, int *type) {
    long n = open_record(r->open.ctx, r->open.iv, r->open.sequence, record, length, out, type);
    if (n != -1) r->open.sequence++;  // authenticated (even without a content type)
    return n;
}

int igris_records_update(struct igris_records *r, int sending) {
    struct igris_direction *d = sending ? &r->seal : &r->open;
    unsigned char next[64];
    if (!igris_expand_label(r->digest, d->secret, r->secret_length, "traffic upd", next, r->secret_length)) return -1;
    memcpy(d->secret, next, r->secret_length);
    OPENSSL_cleanse(next, sizeof next);
    return key_direction(r, d, sending) ? 0 : -1;
}

long igris_tls13_open_record(int cipher, const unsigned char *key, size_t key_length, const unsigned char iv[12],
                             unsigned long long sequence, const unsigned char *record, size_t length,
                             unsigned char *out, int *type) {
    (void)key_length;
    const EVP_CIPHER *evp = aead(cipher);
    EVP_CIPHER_CTX *ctx = evp ? EVP_CIPHER_CTX_new() : NULL;
    long n = ctx && EVP_DecryptInit_ex(ctx, evp, NULL, key, NULL) == 1 ? open_record(ctx, iv, sequence, record, length, out, type) : -1;
    EVP_CIPHER_CTX_free(ctx);
    return n < 0 ? -1 : n;
}
