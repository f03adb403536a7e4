/* kvtier.h compiles as C and its calls report errors as status codes. */
#include <stdio.h>
#include <string.h>

#include "scheduler/kvtier.h"

int main(void) {
  kvtier_config c;
  kvtier_config_default(&c);
  if (c.cuda_graphs != 1) return 1; /* on by default */
  c.num_layers = 2;
  c.num_q_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 64;
  c.dtype = KVTIER_DTYPE_F16;
  c.backend = KVTIER_BACKEND_CPU;
  c.max_context = 1024;
  kvtier_engine* e = NULL;
  /* host_bytes_limit is 0: rejected, naming the field. */
  if (kvtier_engine_create(&c, &e) != KVTIER_ERR_INVALID_ARGUMENT || e != NULL ||
      strstr(kvtier_last_error(), "host_bytes_limit") == NULL) {
    fprintf(stderr, "expected an invalid-argument error, got '%s'\n", kvtier_last_error());
    return 1;
  }
  c.host_bytes_limit = 16u << 20;
  if (kvtier_engine_create(&c, &e) != KVTIER_OK) {
    fprintf(stderr, "create failed: %s\n", kvtier_last_error());
    return 1;
  }
  if (kvtier_remove_sequence(e, 5) != KVTIER_ERR_NOT_FOUND) return 1;
  if (kvtier_add_sequence(e, 5) != KVTIER_OK) return 1;
  int64_t len = -1;
  if (kvtier_sequence_length(e, 5, 0, &len) != KVTIER_OK || len != 0) return 1;
  kvtier_engine_destroy(e);
  printf("ok\n");
  return 0;
}
