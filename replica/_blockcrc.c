/* The per-block checksums of replica/ondisk.py, in C: one call per write or read instead of a
 * Python-level crc32c call, slice and pack per 4 KiB block (about 0.5 us each, 270 us per MiB).
 *
 * block_crcs(data, zero_crc) -> bytes: for every whole 4 KiB block of `data`, the little-endian
 * u32 crc32c(block) ^ zero_crc. The caller handles a short tail. On x86-64 with SSE4.2 four
 * blocks are summed at once, so four independent crc32 instruction chains hide the instruction's
 * latency; elsewhere a table does it, slowly but with the same result.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 4096

static uint32_t table[256];

static void init_table(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        table[i] = c;
    }
}

static uint32_t crc_table(const unsigned char *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    while (n--)
        c = table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

static void blocks_table(const unsigned char *p, size_t nblocks, uint32_t *out) {
    for (size_t b = 0; b < nblocks; b++)
        out[b] = crc_table(p + b * BLOCK, BLOCK);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <nmmintrin.h>
#define HAVE_SSE42_PATH 1

__attribute__((target("sse4.2"))) static uint32_t crc_hw(const unsigned char *p, size_t n) {
    uint64_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i += 8) {
        uint64_t v;
        memcpy(&v, p + i, 8);
        c = _mm_crc32_u64(c, v);
    }
    return (uint32_t)c ^ 0xFFFFFFFFu;
}

__attribute__((target("sse4.2"))) static void blocks_hw(const unsigned char *p, size_t nblocks,
                                                        uint32_t *out) {
    size_t b = 0;
    for (; b + 4 <= nblocks; b += 4) {
        const unsigned char *p0 = p + b * BLOCK, *p1 = p0 + BLOCK, *p2 = p1 + BLOCK,
                            *p3 = p2 + BLOCK;
        uint64_t c0 = 0xFFFFFFFFu, c1 = 0xFFFFFFFFu, c2 = 0xFFFFFFFFu, c3 = 0xFFFFFFFFu;
        for (size_t i = 0; i < BLOCK; i += 8) {
            uint64_t v0, v1, v2, v3;
            memcpy(&v0, p0 + i, 8);
            memcpy(&v1, p1 + i, 8);
            memcpy(&v2, p2 + i, 8);
            memcpy(&v3, p3 + i, 8);
            c0 = _mm_crc32_u64(c0, v0);
            c1 = _mm_crc32_u64(c1, v1);
            c2 = _mm_crc32_u64(c2, v2);
            c3 = _mm_crc32_u64(c3, v3);
        }
        out[b] = (uint32_t)c0 ^ 0xFFFFFFFFu;
        out[b + 1] = (uint32_t)c1 ^ 0xFFFFFFFFu;
        out[b + 2] = (uint32_t)c2 ^ 0xFFFFFFFFu;
        out[b + 3] = (uint32_t)c3 ^ 0xFFFFFFFFu;
    }
    for (; b < nblocks; b++)
        out[b] = crc_hw(p + b * BLOCK, BLOCK);
}
#endif

static int use_hw = 0;

static PyObject *block_crcs(PyObject *self, PyObject *args) {
    Py_buffer buf;
    unsigned int zero;
    if (!PyArg_ParseTuple(args, "y*I", &buf, &zero))
        return NULL;
    size_t nblocks = (size_t)buf.len / BLOCK;
    PyObject *result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(nblocks * 4));
    if (result == NULL) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    uint32_t *out = (uint32_t *)PyBytes_AS_STRING(result);
    const unsigned char *p = (const unsigned char *)buf.buf;
    Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_SSE42_PATH
    if (use_hw)
        blocks_hw(p, nblocks, out);
    else
#endif
        blocks_table(p, nblocks, out);
    for (size_t b = 0; b < nblocks; b++) {
        uint32_t v = out[b] ^ zero;
        unsigned char *o = (unsigned char *)&out[b];
        o[0] = (unsigned char)v;
        o[1] = (unsigned char)(v >> 8);
        o[2] = (unsigned char)(v >> 16);
        o[3] = (unsigned char)(v >> 24);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    return result;
}

static PyMethodDef methods[] = {
    {"block_crcs", block_crcs, METH_VARARGS,
     "block_crcs(data, zero_crc) -> bytes: u32 LE crc32c(block) ^ zero_crc per whole 4 KiB block"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "replica._blockcrc", NULL, -1, methods};

PyMODINIT_FUNC PyInit__blockcrc(void) {
    init_table();
#ifdef HAVE_SSE42_PATH
    __builtin_cpu_init();
    use_hw = __builtin_cpu_supports("sse4.2");
#endif
    return PyModule_Create(&module);
}
