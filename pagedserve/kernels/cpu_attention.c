/* Paged decode attention for CPUs, float32: one query per sequence over its cached context.
 *
 * The torch reference gathers every sequence's K/V into padded tensors before attending; on a
 * CPU that copy, not the arithmetic, is the cost. This reads each K/V row once, in place, and
 * is parallel with OpenMP over sequences (over sequence and KV head when there are few). Built
 * by cpu_build.py, which links it against the OpenMP runtime torch has already loaded, so
 * torch's threads run it.
 *
 * Layouts (asserted by the Python wrapper): query [B, heads, head_dim] with row stride q_stride
 * and contiguous heads; caches [num_blocks, block_size, kv_heads, head_dim] contiguous; block
 * tables [B, >= ceil(len / block_size)] int32 with row stride table_stride; lens [B] int32;
 * out [B, heads, head_dim] contiguous. Query heads g * group .. (g + 1) * group - 1 read KV
 * head g (GQA). A sequence of length 0 gets zeros. Lengths and the block ids they use are
 * checked against the table width and the cache before anything is read.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct {
    const float *q, *k_cache, *v_cache;
    const int32_t *tables, *lens;
    float *out;
    int64_t q_stride, table_stride, table_width, num_blocks, heads, kv_heads, head_dim, block_size;
    float scale;
} Problem;

static float dot(const float *a, const float *b, int64_t n) {
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* Query heads [h0, h1) of one sequence: their KV heads' rows are adjacent in each cache row,
 * so a task covering all heads reads whole rows (the prefetcher fetches no unused lines). */
typedef struct {
    const int32_t *table;
    int64_t len, h0, h1;
} Task;

/* scores[(h - h0) * len + t] = scale * q_h . k_t, for query heads h of the task. */
static void score_keys(const Problem *p, const Task *task, const float *q, float *scores) {
    const int64_t bs = p->block_size, row = p->kv_heads * p->head_dim, d = p->head_dim;
    const int64_t group = p->heads / p->kv_heads, len = task->len;
    for (int64_t first = 0; first < len; first += bs) {
        const float *k = p->k_cache + (int64_t)task->table[first / bs] * bs * row;
        const int64_t n = len - first < bs ? len - first : bs;
        for (int64_t r = 0; r < n; r++, k += row)
            for (int64_t h = task->h0; h < task->h1; h++)
                scores[(h - task->h0) * len + first + r] =
                    p->scale * dot(q + h * d, k + (h / group) * d, d);
    }
}

/* Each row of scores becomes softmax weights. */
static void softmax_rows(float *scores, int64_t rows, int64_t len) {
    for (int64_t g = 0; g < rows; g++) {
        float *s = scores + g * len, top = -INFINITY, total = 0.f;
        for (int64_t t = 0; t < len; t++) top = s[t] > top ? s[t] : top;
        for (int64_t t = 0; t < len; t++) {
            s[t] = expf(s[t] - top);
            total += s[t];
        }
        const float inv = 1.f / total;
        for (int64_t t = 0; t < len; t++) s[t] *= inv;
    }
}

/* out_h = sum_t weights[(h - h0) * len + t] * v_t, for query heads h of the task. */
static void weigh_values(const Problem *p, const Task *task, const float *weights, float *out) {
    const int64_t bs = p->block_size, row = p->kv_heads * p->head_dim, d = p->head_dim;
    const int64_t group = p->heads / p->kv_heads, len = task->len;
    for (int64_t i = task->h0 * d; i < task->h1 * d; i++) out[i] = 0.f;
    for (int64_t first = 0; first < len; first += bs) {
        const float *v = p->v_cache + (int64_t)task->table[first / bs] * bs * row;
        const int64_t n = len - first < bs ? len - first : bs;
        for (int64_t r = 0; r < n; r++, v += row)
            for (int64_t h = task->h0; h < task->h1; h++) {
                const float w = weights[(h - task->h0) * len + first + r];
                const float *vh = v + (h / group) * d;
                float *o = out + h * d;
#pragma omp simd
                for (int64_t i = 0; i < d; i++) o[i] += w * vh[i];
            }
    }
}

/* 0, or 2 when the sequence's length or block ids would read outside the table or cache. */
static int check_sequence(const Problem *p, int64_t seq) {
    const int64_t len = p->lens[seq], used = (len + p->block_size - 1) / p->block_size;
    const int32_t *table = p->tables + seq * p->table_stride;
    if (len < 0 || used > p->table_width) return 2;
    for (int64_t i = 0; i < used; i++)
        if (table[i] < 0 || table[i] >= p->num_blocks) return 2;
    return 0;
}

/* Task `index` of `parts` per sequence: sequence index / parts, query heads split evenly
 * along KV-head boundaries. */
static void attend(const Problem *p, int64_t index, int64_t parts, float *scores) {
    const int64_t seq = index / parts, part = index % parts, group = p->heads / p->kv_heads;
    const Task task = {p->tables + seq * p->table_stride, p->lens[seq],
                       p->kv_heads * part / parts * group, p->kv_heads * (part + 1) / parts * group};
    const float *q = p->q + seq * p->q_stride;
    float *out = p->out + seq * p->heads * p->head_dim;
    score_keys(p, &task, q, scores);
    softmax_rows(scores, task.h1 - task.h0, task.len);
    weigh_values(p, &task, scores, out);
}

/* Returns 0; 1 when out of memory; 2 when a length or block id is out of range (nothing read). */
int paged_decode_f32(const float *q, int64_t q_stride, const float *k_cache,
                     const float *v_cache, int64_t num_blocks, const int32_t *tables,
                     int64_t table_stride, int64_t table_width, const int32_t *lens, float *out,
                     int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim,
                     int64_t block_size, float scale, int64_t num_threads) {
    const Problem p = {q, k_cache, v_cache, tables, lens, out, q_stride, table_stride,
                       table_width, num_blocks, heads, kv_heads, head_dim, block_size, scale};
    int64_t longest = 1;
    for (int64_t b = 0; b < batch; b++) {
        if (check_sequence(&p, b)) return 2;
        longest = lens[b] > longest ? lens[b] : longest;
    }
    /* Whole sequences per task while there are enough to keep every thread busy. */
    const int64_t parts = batch >= 2 * num_threads ? 1 : kv_heads, tasks = batch * parts;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        float *scores = malloc(sizeof(float) * (size_t)(heads * longest));
        failed = scores == NULL;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++)
            if (scores != NULL) attend(&p, task, parts, scores);
        free(scores);
    }
    return failed;
}
