// TLS 1.3's key schedule, served to OpenSSL by a built-in provider ("igris"): its "TLS13-KDF"
// is HKDF-Extract and HKDF-Expand-Label written out over SHA-256/SHA-384 fetched once, and it
// keeps the application traffic secrets of the connection whose handshake this thread runs,
// which the record layer (records.c) and kTLS are keyed from.
//
// Why not OpenSSL's own: its TLS13-KDF builds an EVP_MAC context and parses parameters on
// every one of a handshake's ~22 calls, and OpenSSL 3.0 hands the secrets out only through the
// key-log callback, formatted into hex with one sprintf per byte. Together that was a fifth
// of a resumed handshake's instructions.
#include "COpenSSL.h"
#include <openssl/core.h>
#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/params.h>
#include <openssl/provider.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

// MARK: - HMAC and HKDF over a fetched digest

static EVP_MD *sha256, *sha384;
static pthread_once_t digests_once = PTHREAD_ONCE_INIT;
static void fetch_digests(void) {
    sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
    sha384 = EVP_MD_fetch(NULL, "SHA384", NULL);
}

static const EVP_MD *digest_named(const char *name) {
    pthread_once(&digests_once, fetch_digests);
    if (strcmp(name, "SHA256") == 0 || strcmp(name, "SHA2-256") == 0) return sha256;
    if (strcmp(name, "SHA384") == 0 || strcmp(name, "SHA2-384") == 0) return sha384;
    return NULL;
}

struct part { const unsigned char *bytes; size_t length; };

/// HMAC(key, parts…) = H(key ^ opad || H(key ^ ipad || parts…)), `out` the digest's size.
static int hmac(EVP_MD_CTX *ctx, const EVP_MD *md, const unsigned char *key, size_t key_length,
                const struct part *parts, int count, unsigned char *out) {
    size_t block = (size_t)EVP_MD_get_block_size(md), hash = (size_t)EVP_MD_get_size(md);
    unsigned char padded[128], pad[128], inner[EVP_MAX_MD_SIZE];
    if (block > sizeof padded) return 0;
    unsigned int n = 0;
    int ok = 1;
    memset(padded, 0, sizeof padded);
    if (key_length > block) {
        ok = EVP_DigestInit_ex(ctx, md, NULL) == 1 && EVP_DigestUpdate(ctx, key, key_length) == 1
            && EVP_DigestFinal_ex(ctx, padded, &n) == 1;
    } else if (key_length > 0) {
        memcpy(padded, key, key_length);
    }
    for (size_t i = 0; i < block; i++) pad[i] = padded[i] ^ 0x36;
    ok = ok && EVP_DigestInit_ex(ctx, md, NULL) == 1 && EVP_DigestUpdate(ctx, pad, block) == 1;
    for (int i = 0; ok && i < count; i++) ok = EVP_DigestUpdate(ctx, parts[i].bytes, parts[i].length) == 1;
    ok = ok && EVP_DigestFinal_ex(ctx, inner, &n) == 1;
    for (size_t i = 0; i < block; i++) pad[i] = padded[i] ^ 0x5c;
    ok = ok && EVP_DigestInit_ex(ctx, md, NULL) == 1 && EVP_DigestUpdate(ctx, pad, block) == 1
        && EVP_DigestUpdate(ctx, inner, hash) == 1 && EVP_DigestFinal_ex(ctx, out, &n) == 1;
    OPENSSL_cleanse(padded, block);
    OPENSSL_cleanse(pad, block);
    OPENSSL_cleanse(inner, hash);
    return ok;
}

/// HKDF-Expand-Label(secret, prefix || label, context, length) of RFC 8446 §7.1.
static int expand_label(const EVP_MD *md, const unsigned char *secret, size_t secret_length,
                        const unsigned char *prefix, size_t prefix_length, const unsigned char *label, size_t label_length,
                        const unsigned char *context, size_t context_length, unsigned char *out, size_t length) {
    size_t hash = (size_t)EVP_MD_get_size(md);
    if (prefix_length + label_length > 255 || context_length > 255 || length > 255 * hash || length > 0xFFFF) return 0;
    unsigned char info[2 + 1 + 255 + 1 + 255];
    size_t n = 0;
    info[n++] = (unsigned char)(length >> 8);
    info[n++] = (unsigned char)length;
    info[n++] = (unsigned char)(prefix_length + label_length);
    if (prefix_length) { memcpy(info + n, prefix, prefix_length); n += prefix_length; }
    if (label_length) { memcpy(info + n, label, label_length); n += label_length; }
    info[n++] = (unsigned char)context_length;
    if (context_length) { memcpy(info + n, context, context_length); n += context_length; }
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    int ok = ctx != NULL;
    // HKDF-Expand: T(i) = HMAC(secret, T(i-1) || info || i), as many blocks as `length` needs.
    unsigned char block[EVP_MAX_MD_SIZE];
    for (size_t done = 0, i = 1; ok && done < length; i++) {
        unsigned char counter = (unsigned char)i;
        struct part parts[3] = {{block, i > 1 ? hash : 0}, {info, n}, {&counter, 1}};
        ok = hmac(ctx, md, secret, secret_length, parts, 3, block);
        size_t take = length - done < hash ? length - done : hash;
        if (ok) memcpy(out + done, block, take);
        done += take;
    }
    EVP_MD_CTX_free(ctx);
    OPENSSL_cleanse(block, sizeof block);
    return ok;
}

/// TLS 1.3's "generate secret": HKDF-Extract(salt, input), where a previous secret becomes
/// the salt through Derive-Secret(previous, "derived", ""), and a missing input is zeros.
static int generate_secret(const EVP_MD *md, const unsigned char *previous, size_t previous_length,
                           const unsigned char *input, size_t input_length,
                           const unsigned char *prefix, size_t prefix_length, const unsigned char *label, size_t label_length,
                           unsigned char *out, size_t length) {
    static const unsigned char zeros[EVP_MAX_MD_SIZE];
    size_t hash = (size_t)EVP_MD_get_size(md);
    if (length != hash) return 0;
    if (input == NULL) { input = zeros; input_length = hash; }
    unsigned char salt[EVP_MAX_MD_SIZE], empty_hash[EVP_MAX_MD_SIZE];
    size_t salt_length = 0;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    int ok = ctx != NULL;
    if (ok && previous != NULL) {
        unsigned int n = 0;
        ok = EVP_DigestInit_ex(ctx, md, NULL) == 1 && EVP_DigestFinal_ex(ctx, empty_hash, &n) == 1
            && expand_label(md, previous, previous_length, prefix, prefix_length, label, label_length, empty_hash, hash, salt, hash);
        salt_length = hash;
    }
    struct part ikm = {input, input_length};
    ok = ok && hmac(ctx, md, salt, salt_length, &ikm, 1, out);
    EVP_MD_CTX_free(ctx);
    OPENSSL_cleanse(salt, sizeof salt);
    return ok;
}

int igris_expand_label(const char *digest, const unsigned char *secret, size_t secret_length, const char *label,
                       unsigned char *out, size_t length) {
    const EVP_MD *md = digest_named(digest);
    if (md == NULL || length > (size_t)EVP_MD_get_size(md)) return 0;
    return expand_label(md, secret, secret_length, (const unsigned char *)"tls13 ", 6,
                        (const unsigned char *)label, strlen(label), NULL, 0, out, length);
}

// MARK: - Traffic secrets, kept per connection

struct traffic_secrets { unsigned char client[64], server[64]; size_t client_length, server_length; };
static int secrets_index = -1, capture_index = -1;
static pthread_once_t secrets_once = PTHREAD_ONCE_INIT;

static void secrets_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl, void *argp) {
    (void)parent; (void)ad; (void)idx; (void)argl; (void)argp;
    if (ptr) OPENSSL_clear_free(ptr, sizeof(struct traffic_secrets));
}
static void secrets_init(void) {
    secrets_index = SSL_get_ex_new_index(0, NULL, NULL, NULL, secrets_free);
    capture_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, NULL);
}

/// The connection whose handshake this thread is running (`igris_ssl_do_handshake`): the
/// provider is called without it.
static __thread SSL *handshaking;

int igris_ssl_do_handshake(SSL *ssl) {
    handshaking = ssl;
    int rc = SSL_do_handshake(ssl);
    handshaking = NULL;
    return rc;
}

/// A derived secret: kept when it is an application traffic secret of a connection whose
/// context asked for them.
static void keep_secret(const unsigned char *label, size_t label_length, const unsigned char *secret, size_t length) {
    SSL *ssl = handshaking;
    if (ssl == NULL || label_length != 12 || length > 64) return;
    int client = memcmp(label, "c ap traffic", 12) == 0, server = memcmp(label, "s ap traffic", 12) == 0;
    if (!client && !server) return;
    if (SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), capture_index) == NULL) return;
    struct traffic_secrets *t = SSL_get_ex_data(ssl, secrets_index);
    if (t == NULL) {
        t = OPENSSL_zalloc(sizeof *t);
        if (t == NULL || !SSL_set_ex_data(ssl, secrets_index, t)) { OPENSSL_free(t); return; }
    }
    memcpy(client ? t->client : t->server, secret, length);
    if (client) t->client_length = length; else t->server_length = length;
}

int igris_tls13_traffic_secret(SSL *ssl, int sending, unsigned char secret[64], size_t *secret_length) {
    if (SSL_version(ssl) != TLS1_3_VERSION || secrets_index < 0) return -1;
    struct traffic_secrets *t = SSL_get_ex_data(ssl, secrets_index);
    if (t == NULL) return -1;
    int want_client = sending ? !SSL_is_server(ssl) : SSL_is_server(ssl);
    size_t n = want_client ? t->client_length : t->server_length;
    if (n == 0) return -1;
    memcpy(secret, want_client ? t->client : t->server, n);
    *secret_length = n;
    return 0;
}

// MARK: - The provider's TLS13-KDF

struct schedule {
    int mode;
    const EVP_MD *md;
    /// A digest other than SHA-256/384 (no TLS 1.3 suite igris offers uses one), fetched for
    /// this context.
    EVP_MD *fetched;
    unsigned char key[1024], salt[EVP_MAX_MD_SIZE], prefix[255], label[255], data[255];
    size_t key_length, salt_length, prefix_length, label_length, data_length;
    int has_key, has_salt;
};

static void *schedule_new(void *provider) { (void)provider; return OPENSSL_zalloc(sizeof(struct schedule)); }
/// Clears the secrets held (only as much as was set: the buffers are sized for the worst case).
static int schedule_reset(void *v) {
    struct schedule *s = v;
    OPENSSL_cleanse(s->key, s->key_length);
    OPENSSL_cleanse(s->salt, s->salt_length);
    s->mode = 0;
    s->md = NULL;
    EVP_MD_free(s->fetched);
    s->fetched = NULL;
    s->key_length = s->salt_length = s->prefix_length = s->label_length = s->data_length = 0;
    s->has_key = s->has_salt = 0;
    return 1;
}
static void schedule_free(void *s) {
    if (s == NULL) return;
    schedule_reset(s);
    OPENSSL_free(s);
}
static void *schedule_dup(void *v) {
    struct schedule *s = v, *copy = OPENSSL_malloc(sizeof *copy);
    if (copy == NULL) return NULL;
    memcpy(copy, s, sizeof *copy);
    if (s->fetched != NULL && !EVP_MD_up_ref(s->fetched)) { copy->fetched = NULL; copy->md = NULL; }
    return copy;
}

static int octets(const OSSL_PARAM *p, unsigned char *into, size_t capacity, size_t *length) {
    if (p->data_type != OSSL_PARAM_OCTET_STRING || p->data_size > capacity) return 0;
    if (p->data_size) memcpy(into, p->data, p->data_size);
    *length = p->data_size;
    return 1;
}

static int schedule_set(void *v, const OSSL_PARAM params[]) {
    struct schedule *s = v;
    if (params == NULL) return 1;
    s->data_length = 0;  // as OpenSSL's: the context (transcript hash) is given with each call
    for (const OSSL_PARAM *p = params; p->key != NULL; p++) {
        int ok = 1;
        if (strcmp(p->key, OSSL_KDF_PARAM_MODE) == 0) {
            if (p->data_type == OSSL_PARAM_UTF8_STRING) {
                const char *m = p->data;
                s->mode = strcmp(m, "EXTRACT_ONLY") == 0 ? EVP_KDF_HKDF_MODE_EXTRACT_ONLY
                        : strcmp(m, "EXPAND_ONLY") == 0 ? EVP_KDF_HKDF_MODE_EXPAND_ONLY : -1;
            } else {
                ok = OSSL_PARAM_get_int(p, &s->mode);
            }
            ok = ok && (s->mode == EVP_KDF_HKDF_MODE_EXTRACT_ONLY || s->mode == EVP_KDF_HKDF_MODE_EXPAND_ONLY);
        } else if (strcmp(p->key, OSSL_KDF_PARAM_DIGEST) == 0) {
            ok = p->data_type == OSSL_PARAM_UTF8_STRING;
            if (ok && (s->md = digest_named(p->data)) == NULL) {
                EVP_MD_free(s->fetched);
                s->md = s->fetched = EVP_MD_fetch(NULL, p->data, NULL);
                ok = s->md != NULL;
            }
        } else if (strcmp(p->key, OSSL_KDF_PARAM_KEY) == 0) {
            ok = s->has_key = octets(p, s->key, sizeof s->key, &s->key_length);
        } else if (strcmp(p->key, OSSL_KDF_PARAM_SALT) == 0) {
            ok = s->has_salt = octets(p, s->salt, sizeof s->salt, &s->salt_length);
        } else if (strcmp(p->key, OSSL_KDF_PARAM_PREFIX) == 0) {
            ok = octets(p, s->prefix, sizeof s->prefix, &s->prefix_length);
        } else if (strcmp(p->key, OSSL_KDF_PARAM_LABEL) == 0) {
            ok = octets(p, s->label, sizeof s->label, &s->label_length);
        } else if (strcmp(p->key, OSSL_KDF_PARAM_DATA) == 0) {
            ok = octets(p, s->data, sizeof s->data, &s->data_length);
        }
        if (!ok) return 0;
    }
    return 1;
}

static int schedule_derive(void *v, unsigned char *out, size_t length, const OSSL_PARAM params[]) {
    struct schedule *s = v;
    if (!schedule_set(s, params) || s->md == NULL) return 0;
    if (s->mode == EVP_KDF_HKDF_MODE_EXTRACT_ONLY) {
        return generate_secret(s->md, s->has_salt ? s->salt : NULL, s->salt_length, s->has_key ? s->key : NULL, s->key_length,
                               s->prefix, s->prefix_length, s->label, s->label_length, out, length);
    }
    if (s->mode != EVP_KDF_HKDF_MODE_EXPAND_ONLY || !s->has_key) return 0;
    if (!expand_label(s->md, s->key, s->key_length, s->prefix, s->prefix_length, s->label, s->label_length,
                      s->data, s->data_length, out, length)) return 0;
    keep_secret(s->label, s->label_length, out, length);
    return 1;
}

static const OSSL_PARAM *schedule_settable(void *s, void *provider) {
    (void)s; (void)provider;
    static const OSSL_PARAM settable[] = {
        OSSL_PARAM_utf8_string(OSSL_KDF_PARAM_MODE, NULL, 0),
        OSSL_PARAM_int(OSSL_KDF_PARAM_MODE, NULL),
        OSSL_PARAM_utf8_string(OSSL_KDF_PARAM_DIGEST, NULL, 0),
        OSSL_PARAM_octet_string(OSSL_KDF_PARAM_KEY, NULL, 0),
        OSSL_PARAM_octet_string(OSSL_KDF_PARAM_SALT, NULL, 0),
        OSSL_PARAM_octet_string(OSSL_KDF_PARAM_PREFIX, NULL, 0),
        OSSL_PARAM_octet_string(OSSL_KDF_PARAM_LABEL, NULL, 0),
        OSSL_PARAM_octet_string(OSSL_KDF_PARAM_DATA, NULL, 0),
        OSSL_PARAM_END,
    };
    return settable;
}

static int schedule_get(void *v, OSSL_PARAM params[]) {
    struct schedule *s = v;
    OSSL_PARAM *p = OSSL_PARAM_locate(params, OSSL_KDF_PARAM_SIZE);
    if (p == NULL) return 1;
    if (s->mode == EVP_KDF_HKDF_MODE_EXTRACT_ONLY) return s->md != NULL && OSSL_PARAM_set_size_t(p, (size_t)EVP_MD_get_size(s->md));
    return OSSL_PARAM_set_size_t(p, SIZE_MAX);
}

static const OSSL_PARAM *schedule_gettable(void *s, void *provider) {
    (void)s; (void)provider;
    static const OSSL_PARAM gettable[] = { OSSL_PARAM_size_t(OSSL_KDF_PARAM_SIZE, NULL), OSSL_PARAM_END };
    return gettable;
}

typedef void (*function)(void);
static const OSSL_DISPATCH schedule_functions[] = {
    {OSSL_FUNC_KDF_NEWCTX, (function)schedule_new},
    {OSSL_FUNC_KDF_FREECTX, (function)schedule_free},
    {OSSL_FUNC_KDF_DUPCTX, (function)schedule_dup},
    {OSSL_FUNC_KDF_RESET, (function)schedule_reset},
    {OSSL_FUNC_KDF_DERIVE, (function)schedule_derive},
    {OSSL_FUNC_KDF_SETTABLE_CTX_PARAMS, (function)schedule_settable},
    {OSSL_FUNC_KDF_SET_CTX_PARAMS, (function)schedule_set},
    {OSSL_FUNC_KDF_GETTABLE_CTX_PARAMS, (function)schedule_gettable},
    {OSSL_FUNC_KDF_GET_CTX_PARAMS, (function)schedule_get},
    {0, NULL},
};

static const OSSL_ALGORITHM kdfs[] = {
    {OSSL_KDF_NAME_TLS1_3_KDF, "provider=igris", schedule_functions, "TLS 1.3 key schedule"},
    {NULL, NULL, NULL, NULL},
};

static const OSSL_ALGORITHM *query(void *provider, int operation, int *no_cache) {
    (void)provider;
    *no_cache = 0;
    return operation == OSSL_OP_KDF ? kdfs : NULL;
}

static const OSSL_DISPATCH provider_functions[] = {
    {OSSL_FUNC_PROVIDER_QUERY_OPERATION, (function)query},
    {0, NULL},
};

static int provider_init(const OSSL_CORE_HANDLE *handle, const OSSL_DISPATCH *in, const OSSL_DISPATCH **out, void **context) {
    (void)in;
    *out = provider_functions;
    *context = (void *)handle;
    return 1;
}

// MARK: - Contexts

static int provider_loaded;
static pthread_once_t provider_once = PTHREAD_ONCE_INIT;
static void load_provider(void) {
    // The digests first: fetching activates OpenSSL's configured (or default) providers, which
    // loading one of our own before would have left out.
    pthread_once(&digests_once, fetch_digests);
    provider_loaded = sha256 != NULL && sha384 != NULL
        && OSSL_PROVIDER_add_builtin(NULL, "igris", provider_init) == 1 && OSSL_PROVIDER_load(NULL, "igris") != NULL;
}

SSL_CTX *igris_ssl_ctx_new(int server) {
    pthread_once(&secrets_once, secrets_init);
    pthread_once(&provider_once, load_provider);
    // "?": preferred where it has the algorithm; everything else comes from the others.
    return SSL_CTX_new_ex(NULL, provider_loaded ? "?provider=igris" : NULL, server ? TLS_server_method() : TLS_client_method());
}

int igris_ssl_ctx_capture_traffic_secrets(SSL_CTX *ctx) {
    pthread_once(&secrets_once, secrets_init);
    if (secrets_index < 0 || capture_index < 0) return -1;
    return SSL_CTX_set_ex_data(ctx, capture_index, (void *)1) == 1 ? 0 : -1;
}
