#include "COpenSSL.h"
#include <openssl/rand.h>
#include <openssl/evp.h>
#include <openssl/core_names.h>
#include <pthread.h>
#include <string.h>
#include <time.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <linux/tls.h>

// MARK: - SNI

struct igris_sni { igris_sni_callback callback; void *arg; };
static int sni_index = -1;
static pthread_once_t sni_once = PTHREAD_ONCE_INIT;
static void sni_init(void) { sni_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, NULL); }

static int sni_trampoline(SSL *ssl, int *alert, void *arg) {
    (void)arg;
    struct igris_sni *sni = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), sni_index);
    if (sni == NULL) return SSL_TLSEXT_ERR_OK;
    if (sni->callback(ssl, sni->arg) != 0) {
        *alert = SSL_AD_UNRECOGNIZED_NAME;
        return SSL_TLSEXT_ERR_ALERT_FATAL;
    }
    return SSL_TLSEXT_ERR_OK;
}

void igris_ssl_ctx_set_sni(SSL_CTX *ctx, igris_sni_callback callback, void *arg) {
    pthread_once(&sni_once, sni_init);
    // Lives as long as the process: one per listener context, made at start and on reload.
    struct igris_sni *sni = OPENSSL_malloc(sizeof *sni);
    sni->callback = callback;
    sni->arg = arg;
    SSL_CTX_set_ex_data(ctx, sni_index, sni);
    SSL_CTX_set_tlsext_servername_callback(ctx, sni_trampoline);
}

// MARK: - ALPN

struct igris_alpn { const unsigned char *wire; unsigned length; };

static int alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                       const unsigned char *in, unsigned inlen, void *arg) {
    (void)ssl;
    struct igris_alpn *alpn = arg;
    unsigned char *selected = NULL;
    if (SSL_select_next_proto(&selected, outlen, alpn->wire, alpn->length, in, inlen) != OPENSSL_NPN_NEGOTIATED)
        return SSL_TLSEXT_ERR_ALERT_FATAL;
    *out = selected;
    return SSL_TLSEXT_ERR_OK;
}

void igris_ssl_ctx_set_alpn_select(SSL_CTX *ctx, const unsigned char *wire, unsigned length) {
    struct igris_alpn *alpn = OPENSSL_malloc(sizeof *alpn);
    alpn->wire = wire;
    alpn->length = length;
    SSL_CTX_set_alpn_select_cb(ctx, alpn_select, alpn);
}

// MARK: - Ticket keys

struct ticket_key { unsigned char name[16]; unsigned char aes[32]; unsigned char hmac[32]; time_t made; };
struct ticket_keys {
    pthread_mutex_t lock;
    unsigned rotate_seconds;
    struct ticket_key current, previous;
    int have_previous;
};
static int ticket_index = -1;
static pthread_once_t ticket_once = PTHREAD_ONCE_INIT;
static void ticket_init(void) { ticket_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, NULL); }

static int make_key(struct ticket_key *k) {
    k->made = time(NULL);
    return RAND_bytes(k->name, sizeof k->name) == 1 && RAND_bytes(k->aes, sizeof k->aes) == 1
        && RAND_bytes(k->hmac, sizeof k->hmac) == 1;
}

static int set_cipher_and_mac(struct ticket_key *k, unsigned char *iv, EVP_CIPHER_CTX *cctx, EVP_MAC_CTX *mctx, int enc) {
    OSSL_PARAM params[2];
    params[0] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, "SHA256", 0);
    params[1] = OSSL_PARAM_construct_end();
    if (EVP_CipherInit_ex(cctx, EVP_aes_256_cbc(), NULL, k->aes, iv, enc) != 1) return 0;
    return EVP_MAC_CTX_set_params(mctx, params) == 1 && EVP_MAC_init(mctx, k->hmac, sizeof k->hmac, NULL) == 1;
}

static int ticket_callback(SSL *ssl, unsigned char key_name[16], unsigned char *iv,
                           EVP_CIPHER_CTX *cctx, EVP_MAC_CTX *mctx, int enc) {
    struct ticket_keys *keys = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), ticket_index);
    if (keys == NULL) return -1;
    int rc = 0;
    pthread_mutex_lock(&keys->lock);
    time_t now = time(NULL);
    if (now - keys->current.made >= (time_t)keys->rotate_seconds) {
        struct ticket_key next;
        if (make_key(&next)) {
            keys->previous = keys->current;
            keys->have_previous = 1;
            keys->current = next;
        }
    }
    if (enc) {
        if (RAND_bytes(iv, EVP_MAX_IV_LENGTH) == 1) {
            memcpy(key_name, keys->current.name, 16);
            rc = set_cipher_and_mac(&keys->current, iv, cctx, mctx, 1) ? 1 : -1;
        } else {
            rc = -1;
        }
    } else if (memcmp(key_name, keys->current.name, 16) == 0) {
        // 2 (renew): a resumed connection gets a fresh ticket. OpenSSL clients use a TLS 1.3
        // session once, so without one every other connection would be a full handshake.
        rc = set_cipher_and_mac(&keys->current, iv, cctx, mctx, 0) ? 2 : -1;
    } else if (keys->have_previous && memcmp(key_name, keys->previous.name, 16) == 0
               && now - keys->previous.made < 2 * (time_t)keys->rotate_seconds) {
        rc = set_cipher_and_mac(&keys->previous, iv, cctx, mctx, 0) ? 2 : -1;
    }
    pthread_mutex_unlock(&keys->lock);
    return rc;
}

int igris_ssl_ctx_rotate_ticket_keys(SSL_CTX *ctx, unsigned rotate_seconds) {
    pthread_once(&ticket_once, ticket_init);
    struct ticket_keys *keys = OPENSSL_zalloc(sizeof *keys);
    if (keys == NULL) return -1;
    pthread_mutex_init(&keys->lock, NULL);
    keys->rotate_seconds = rotate_seconds ? rotate_seconds : 3600;
    if (!make_key(&keys->current)) { OPENSSL_free(keys); return -1; }
    SSL_CTX_set_ex_data(ctx, ticket_index, keys);
    return SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, ticket_callback) == 1 ? 0 : -1;
}

// MARK: - Client sessions

struct remembered { pthread_mutex_t lock; SSL_SESSION *session; };
static int remembered_index = -1;
static pthread_once_t remembered_once = PTHREAD_ONCE_INIT;
static void remembered_init(void) { remembered_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, NULL); }

static int remember_session(SSL *ssl, SSL_SESSION *session) {
    struct remembered *r = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), remembered_index);
    if (r == NULL) return 0;
    pthread_mutex_lock(&r->lock);
    SSL_SESSION *old = r->session;
    r->session = session;  // the callback's reference is ours now (return 1)
    pthread_mutex_unlock(&r->lock);
    if (old) SSL_SESSION_free(old);
    return 1;
}

int igris_ssl_ctx_remember_sessions(SSL_CTX *ctx) {
    pthread_once(&remembered_once, remembered_init);
    struct remembered *r = OPENSSL_zalloc(sizeof *r);
    if (r == NULL) return -1;
    pthread_mutex_init(&r->lock, NULL);
    SSL_CTX_set_ex_data(ctx, remembered_index, r);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx, remember_session);
    return 0;
}

void igris_ssl_resume(SSL *ssl) {
    struct remembered *r = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), remembered_index);
    if (r == NULL) return;
    pthread_mutex_lock(&r->lock);
    if (r->session && SSL_SESSION_is_resumable(r->session)) SSL_set_session(ssl, r->session);
    pthread_mutex_unlock(&r->lock);
}

// MARK: - CRL

int igris_ssl_ctx_load_crl(SSL_CTX *ctx, const char *path) {
    X509_STORE *store = SSL_CTX_get_cert_store(ctx);
    X509_LOOKUP *lookup = X509_STORE_add_lookup(store, X509_LOOKUP_file());
    if (lookup == NULL) return -1;
    int n = X509_load_crl_file(lookup, path, X509_FILETYPE_PEM);
    if (n <= 0) return -1;
    X509_STORE_set_flags(store, X509_V_FLAG_CRL_CHECK);
    return n;
}

// MARK: - Peer names

int igris_ssl_peer_name(SSL *ssl, int use_san, char *out, size_t capacity) {
    X509 *cert = SSL_get0_peer_certificate(ssl);
    if (cert == NULL || capacity == 0) return -1;
    if (!use_san) {
        int n = X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, out, (int)capacity);
        return n > 0 ? n : -1;
    }
    GENERAL_NAMES *names = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);
    int result = -1;
    for (int i = 0; names != NULL && i < sk_GENERAL_NAME_num(names); i++) {
        GENERAL_NAME *name = sk_GENERAL_NAME_value(names, i);
        ASN1_IA5STRING *text = NULL;
        if (name->type == GEN_DNS) text = name->d.dNSName;
        else if (name->type == GEN_EMAIL) text = name->d.rfc822Name;
        else if (name->type == GEN_URI) text = name->d.uniformResourceIdentifier;
        if (text == NULL) continue;
        int length = ASN1_STRING_length(text);
        if (length <= 0 || (size_t)length >= capacity) continue;
        memcpy(out, ASN1_STRING_get0_data(text), (size_t)length);
        out[length] = 0;
        result = length;
        break;
    }
    GENERAL_NAMES_free(names);
    return result;
}

// MARK: - Certificate files

int igris_certificate_expiry(const char *path, long long *seconds_left) {
    BIO *bio = BIO_new_file(path, "r");
    if (bio == NULL) return -1;
    X509 *cert = PEM_read_bio_X509(bio, NULL, NULL, NULL);
    BIO_free(bio);
    if (cert == NULL) return -1;
    int days = 0, seconds = 0;
    int ok = ASN1_TIME_diff(&days, &seconds, NULL, X509_get0_notAfter(cert));
    X509_free(cert);
    if (!ok) return -1;
    *seconds_left = (long long)days * 86400 + seconds;
    return 0;
}

// MARK: - Input in place

struct input { const unsigned char *data; size_t length; };
static BIO_METHOD *input_method;
static pthread_once_t input_once = PTHREAD_ONCE_INIT;

static int input_read(BIO *bio, char *out, int capacity) {
    struct input *in = BIO_get_data(bio);
    BIO_clear_retry_flags(bio);
    if (in->length == 0) {
        BIO_set_retry_read(bio);
        return -1;
    }
    size_t n = in->length < (size_t)capacity ? in->length : (size_t)capacity;
    memcpy(out, in->data, n);
    in->data += n;
    in->length -= n;
    return (int)n;
}

static int input_write(BIO *bio, const char *data, int length) { (void)bio; (void)data; (void)length; return -1; }

static long input_ctrl(BIO *bio, int cmd, long num, void *ptr) {
    (void)num; (void)ptr;
    struct input *in = BIO_get_data(bio);
    switch (cmd) {
    case BIO_CTRL_PENDING: return (long)in->length;
    case BIO_CTRL_FLUSH: return 1;
    default: return 0;
    }
}

static int input_create(BIO *bio) {
    struct input *in = OPENSSL_zalloc(sizeof *in);
    if (in == NULL) return 0;
    BIO_set_data(bio, in);
    BIO_set_init(bio, 1);
    return 1;
}

static int input_destroy(BIO *bio) {
    OPENSSL_free(BIO_get_data(bio));
    BIO_set_data(bio, NULL);
    return 1;
}

static void input_init(void) {
    input_method = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "igris input");
    if (input_method == NULL) return;
    BIO_meth_set_read(input_method, input_read);
    BIO_meth_set_write(input_method, input_write);
    BIO_meth_set_ctrl(input_method, input_ctrl);
    BIO_meth_set_create(input_method, input_create);
    BIO_meth_set_destroy(input_method, input_destroy);
}

BIO *igris_input_bio_new(void) {
    pthread_once(&input_once, input_init);
    return input_method ? BIO_new(input_method) : NULL;
}

void igris_input_bio_set(BIO *bio, const void *data, size_t length) {
    struct input *in = BIO_get_data(bio);
    in->data = data;
    in->length = length;
}

size_t igris_input_bio_left(BIO *bio) {
    struct input *in = BIO_get_data(bio);
    return in->length;
}

// MARK: - Kernel TLS hand-off

int igris_tls13_suite(SSL *ssl, const char **digest, size_t *key_length, size_t *hash_length) {
    const SSL_CIPHER *c = SSL_get_current_cipher(ssl);
    if (c == NULL || SSL_version(ssl) != TLS1_3_VERSION) return -1;
    switch (SSL_CIPHER_get_id(c) & 0xFFFF) {
    case 0x1301: *digest = "SHA256"; *key_length = 16; *hash_length = 32; return TLS_CIPHER_AES_GCM_128;
    case 0x1302: *digest = "SHA384"; *key_length = 32; *hash_length = 48; return TLS_CIPHER_AES_GCM_256;
    case 0x1303: *digest = "SHA256"; *key_length = 32; *hash_length = 32; return TLS_CIPHER_CHACHA20_POLY1305;
    default: return -1;
    }
}

int igris_tls13_traffic_keys(SSL *ssl, int sending, unsigned char key[32], size_t *key_length, unsigned char iv[12]) {
    const char *digest;
    size_t length, hash_length, secret_length;
    unsigned char secret[64];
    int cipher = igris_tls13_suite(ssl, &digest, &length, &hash_length);
    if (cipher < 0 || igris_tls13_traffic_secret(ssl, sending, secret, &secret_length) != 0) return -1;
    int ok = igris_expand_label(digest, secret, secret_length, "key", key, length)
        && igris_expand_label(digest, secret, secret_length, "iv", iv, 12);
    OPENSSL_cleanse(secret, sizeof secret);
    if (!ok) return -1;
    *key_length = length;
    return cipher;
}

int igris_ktls_attach(int fd) {
    return setsockopt(fd, IPPROTO_TCP, TCP_ULP, "tls", 3) == 0 ? 0 : -errno;
}

int igris_ktls_install(int fd, int transmit, int cipher, const unsigned char *key, size_t key_length,
                       const unsigned char iv[12], unsigned long long sequence) {
    unsigned char seq[8];
    for (int i = 0; i < 8; i++) seq[i] = (unsigned char)(sequence >> (56 - 8 * i));
    union {
        struct tls12_crypto_info_aes_gcm_128 gcm128;
        struct tls12_crypto_info_aes_gcm_256 gcm256;
        struct tls12_crypto_info_chacha20_poly1305 chacha;
    } info;
    memset(&info, 0, sizeof info);
    size_t size;
    switch (cipher) {
    case TLS_CIPHER_AES_GCM_128:
        if (key_length != 16) return -EINVAL;
        info.gcm128.info.version = TLS_1_3_VERSION; info.gcm128.info.cipher_type = TLS_CIPHER_AES_GCM_128;
        memcpy(info.gcm128.salt, iv, 4); memcpy(info.gcm128.iv, iv + 4, 8); memcpy(info.gcm128.key, key, 16); memcpy(info.gcm128.rec_seq, seq, 8);
        size = sizeof info.gcm128;
        break;
    case TLS_CIPHER_AES_GCM_256:
        if (key_length != 32) return -EINVAL;
        info.gcm256.info.version = TLS_1_3_VERSION; info.gcm256.info.cipher_type = TLS_CIPHER_AES_GCM_256;
        memcpy(info.gcm256.salt, iv, 4); memcpy(info.gcm256.iv, iv + 4, 8); memcpy(info.gcm256.key, key, 32); memcpy(info.gcm256.rec_seq, seq, 8);
        size = sizeof info.gcm256;
        break;
    case TLS_CIPHER_CHACHA20_POLY1305:
        if (key_length != 32) return -EINVAL;
        info.chacha.info.version = TLS_1_3_VERSION; info.chacha.info.cipher_type = TLS_CIPHER_CHACHA20_POLY1305;
        memcpy(info.chacha.iv, iv, 12); memcpy(info.chacha.key, key, 32); memcpy(info.chacha.rec_seq, seq, 8);
        size = sizeof info.chacha;
        break;
    default:
        return -EINVAL;
    }
    int rc = setsockopt(fd, SOL_TLS, transmit ? TLS_TX : TLS_RX, &info, (socklen_t)size);
    OPENSSL_cleanse(&info, sizeof info);
    return rc == 0 ? 0 : -errno;
}
