// The C API (include/lowbit.h): a loaded graph, its plan for the chosen kernel path, and running it.
#include <algorithm>
#include <atomic>
#include <exception>
#include <cstdio>
#include <memory>
#include <mutex>
#include <new>
#include <thread>

#include <sys/stat.h>

#include "binary.h"
#include "int8_layer.h"
#include "ops.h"

namespace lowbit {
namespace {

thread_local std::string last_error;

struct PathName {
  const char* name;
  int64_t id;
};

// Fastest first; "float" (every layer on the float code) is not a kernel path.
const PathName kPaths[] = {{"avx512", kAvx512}, {"avx2", kAvx2}, {"neon", kNeon}, {"scalar", kScalar}};
constexpr int64_t kFloatPath = -1;

struct Step {
  int node;
  const BinaryLayer* binary;  // the bit-serial kernels (nullptr: not these)
  const Int8Layer* int8;      // the integer kernels (nullptr: not these; both nullptr: the float code)
  std::vector<int> inputs;
  int out;          // the node whose value the step writes: `node`, or the activation fused into it
  Activation then;  // that fused activation (kind None: none)
  const BinaryLayer* packs_for = nullptr;  // the next step's layer, when this one may write its packed input instead
};

// Runs body over [0, n) on the calling thread and up to threads - 1 workers of the kernels' persistent pool
// (driver.h pool_parallel: no thread started per section; every task writes its own outputs, so results do
// not depend on the thread count).
struct ThreadPool {
  int threads;
  void operator()(int64_t n, const ParallelBody& body) const { pool_parallel(threads, n, body); }
};

}  // namespace
}  // namespace lowbit

struct lowbit_model {
  lowbit::Graph graph;
  std::vector<std::unique_ptr<lowbit::BinaryLayer>> binary;  // per node, nullptr where the kernels do not apply
  std::vector<std::unique_ptr<lowbit::Int8Layer>> int8;      // per node, where the binary kernels do not apply
  std::vector<lowbit::Step> steps;
  std::vector<int> last_use;  // per node: the last step reading it (its buffer returns to the pool after that step)
  // Buffers of finished values, reused by later steps and later runs (a run takes the whole pool and puts
  // it back, so concurrent runs of one model each get their own buffers).
  std::vector<lowbit::Floats> pool;
  std::mutex pool_lock;
  int64_t path = lowbit::kFloatPath;
  std::string path_name = "float";
  int threads = 1;
};

namespace lowbit {
namespace {

// Packs a weight layer's float weight for the float code the first time a plan runs it there (binary layers
// on the kernels never need it: start-up stays with the kernels' own planning). A packed weight is decoded
// into `scratch` (reused from layer to layer) for the packing only.
void prepare_layer(Graph& graph, int index, Floats& scratch) {
  Node& node = graph.nodes[static_cast<size_t>(index)];
  Weight& w = node.weight;
  const bool layer = node.op == "conv2d" || node.op == "conv_transpose2d" || node.op == "linear";
  if (!layer || !w.gemm.empty() || !w.columns.tiles.empty()) return;
  const int source = node.inputs[0];
  Shape input{1};
  const Shape& sample = source < 0 ? graph.input_shape : graph.nodes[static_cast<size_t>(source)].out_shape;
  input.insert(input.end(), sample.begin(), sample.end());
  if (w.packed) {
    scratch.resize(static_cast<size_t>(numel(w.shape)));
    w.decode(0, numel(w.shape), scratch.data());
    w.values.swap(scratch);
  }
  prepare_float_layer(node, input);
  if (w.packed) w.values.swap(scratch);
}

// Per node: how many steps read it.
std::vector<int> readers_of(const Graph& graph, const std::vector<Step>& steps) {
  std::vector<int> readers(graph.nodes.size(), 0);
  for (const Step& step : steps) {
    for (const int i : step.inputs) if (i >= 0) ++readers[static_cast<size_t>(i)];
  }
  return readers;
}

// Fuses every element-wise activation into the step producing its only input, when nothing else reads that
// input: the producer writes the activation's value in its own pass (no buffer, no second pass).
void fuse_activations(const Graph& graph, std::vector<Step>& steps) {
  const std::vector<int> readers = readers_of(graph, steps);
  std::vector<int> producer(graph.nodes.size(), -1);
  for (size_t s = 0; s < steps.size(); ++s) producer[static_cast<size_t>(steps[s].node)] = static_cast<int>(s);
  std::vector<bool> fused(steps.size(), false);
  for (size_t s = 0; s < steps.size(); ++s) {
    const Node& node = graph.nodes[static_cast<size_t>(steps[s].node)];
    const Activation act = activation_of(node);
    if (act.kind == Activation::None || steps[s].inputs.size() != 1) continue;
    const int source = steps[s].inputs[0];
    if (source < 0 || source == graph.output || readers[static_cast<size_t>(source)] != 1) continue;
    Step& from = steps[static_cast<size_t>(producer[static_cast<size_t>(source)])];
    if (from.then.kind != Activation::None || graph.nodes[static_cast<size_t>(from.node)].op == "constant") continue;
    from.then = act, from.out = steps[s].node;
    fused[s] = true;
  }
  std::vector<Step> kept;
  for (size_t s = 0; s < steps.size(); ++s) if (!fused[s]) kept.push_back(steps[s]);
  steps.swap(kept);
}

// Lets a binary step write the packed input of the next step (binary.h packs_from, plan_cuts) when that step is its
// output's only reader: the float output is then never stored nor packed (the fused threshold epilogue).
void fuse_packing(const Graph& graph, std::vector<std::unique_ptr<BinaryLayer>>& binary, std::vector<Step>& steps) {
  const std::vector<int> readers = readers_of(graph, steps);
  for (size_t s = 0; s + 1 < steps.size(); ++s) {
    Step &from = steps[s], &to = steps[s + 1];
    if (!from.binary || !to.binary || from.then.kind != Activation::None || to.binary->source != from.out) continue;
    if (from.out == graph.output || readers[static_cast<size_t>(from.out)] != 1) continue;
    if (packs_from(*to.binary, *from.binary) && plan_cuts(*binary[static_cast<size_t>(from.node)], *to.binary)) {
      from.packs_for = to.binary;
    }
  }
}

// Plans the graph for `path`: kernel layers (bit planes or integer) on the kernels, the rest on float code; drops nodes nothing reads
// and fuses activations into their producers.
void plan(lowbit_model& m, int64_t path) {
  std::vector<Step> steps;
  for (size_t k = 0; k < m.graph.nodes.size(); ++k) {
    const BinaryLayer* b = path == kFloatPath ? nullptr : m.binary[k].get();
    const Int8Layer* q = path == kFloatPath ? nullptr : m.int8[k].get();
    const std::vector<int> inputs = b   ? std::vector<int>{b->source}
                                    : q ? std::vector<int>{q->input.source}
                                        : m.graph.nodes[k].inputs;
    steps.push_back(Step{static_cast<int>(k), b, q, inputs, static_cast<int>(k), Activation()});
  }
  std::vector<bool> needed(m.graph.nodes.size(), false);
  needed[static_cast<size_t>(m.graph.output)] = true;
  std::vector<Step> kept;
  for (auto it = steps.rbegin(); it != steps.rend(); ++it) {
    if (!needed[static_cast<size_t>(it->node)]) continue;
    for (const int i : it->inputs) if (i >= 0) needed[static_cast<size_t>(i)] = true;
    kept.push_back(*it);
  }
  m.steps.assign(kept.rbegin(), kept.rend());
  fuse_activations(m.graph, m.steps);
  fuse_packing(m.graph, m.binary, m.steps);
  Floats scratch;
  for (const Step& step : m.steps) {
    if (!step.binary && !step.int8) prepare_layer(m.graph, step.node, scratch);
  }
  m.last_use.assign(m.graph.nodes.size(), -1);
  for (size_t s = 0; s < m.steps.size(); ++s) {
    for (const int i : m.steps[s].inputs) if (i >= 0) m.last_use[static_cast<size_t>(i)] = static_cast<int>(s);
  }
  m.path = path;
}

Shape full_shape(const Node& node, int64_t batch) {
  if (node.op == "constant") return node.out_shape;
  Shape shape{batch};
  shape.insert(shape.end(), node.out_shape.begin(), node.out_shape.end());
  return shape;
}

using Pool = std::vector<Floats>;

// Gives `data` `count` values from the pool: the smallest buffer that holds them, else the largest (grown).
void acquire(Pool& pool, Floats& data, size_t count) {
  size_t pick = pool.size();
  for (size_t k = 0; k < pool.size(); ++k) {
    const size_t size = pool[k].size(), best = pick < pool.size() ? pool[pick].size() : 0;
    if (pick == pool.size() || (best >= count ? size >= count && size < best : size > best)) pick = k;
  }
  if (pick < pool.size()) {
    data.swap(pool[pick]);
    pool.erase(pool.begin() + static_cast<std::ptrdiff_t>(pick));
  }
  data.resize(count);
}

// The activation fused after a kernel layer, shared out over the threads in chunks when the output is large (the
// output layer's tanh at batch 64 was the one serial pass left: element-wise, so any thread count gives the same values).
void activate_all(const Activation& act, Tensor& out, const ParallelFor& parallel) {
  constexpr int64_t kChunk = 8192;
  float* data = out.data.data();
  const int64_t count = static_cast<int64_t>(out.data.size());
  if (act.kind == Activation::None) return;
  if (count < 2 * kChunk) return activate(act, data, data, count);
  parallel((count + kChunk - 1) / kChunk, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) activate(act, data + k * kChunk, data + k * kChunk, std::min(kChunk, count - k * kChunk));
  });
}

void release(Pool& pool, Floats& data) {
  pool.push_back(std::move(data));
  data = Floats();
}

void run(lowbit_model& m, const float* input, int64_t batch, float* output) {
  Pool pool;
  {
    const std::lock_guard<std::mutex> hold(m.pool_lock);
    pool.swap(m.pool);
  }
  Tensor x;
  x.shape = {batch};
  x.shape.insert(x.shape.end(), m.graph.input_shape.begin(), m.graph.input_shape.end());
  acquire(pool, x.data, static_cast<size_t>(numel(x.shape)));
  std::copy(input, input + numel(x.shape), x.data.begin());
  std::vector<Tensor> values(m.graph.nodes.size());
  const ThreadPool workers{m.threads};
  const ParallelFor parallel = workers;
  // The packed inputs fused steps write for the next one (per thread, reused across runs): `ready` holds one.
  thread_local std::vector<uint64_t> handed[2];
  int ready = -1;
  for (size_t s = 0; s < m.steps.size(); ++s) {
    const Step& step = m.steps[s];
    const Node& node = m.graph.nodes[static_cast<size_t>(step.node)];
    Tensor& out = values[static_cast<size_t>(step.out)];
    out.shape = full_shape(node, batch);
    acquire(pool, out.data, static_cast<size_t>(numel(out.shape)));
    std::vector<const Tensor*> inputs;
    for (const int i : step.inputs) inputs.push_back(i < 0 ? &x : &values[static_cast<size_t>(i)]);
    if (step.binary || step.int8) {
      if (step.binary) {
        const uint64_t* packed = ready >= 0 ? handed[ready].data() : nullptr;
        const int into = ready == 0 ? 1 : 0;
        ready = run_binary(*step.binary, *inputs[0], m.path, parallel, out, packed, step.packs_for, &handed[into]) ? into : -1;
      } else {
        run_int8(*step.int8, *inputs[0], m.path, parallel, out);
      }
      activate_all(step.then, out, parallel);
    } else {
      run_op(node, inputs, out, parallel, step.then);
    }
    for (const int i : step.inputs) {
      if (i >= 0 && m.last_use[static_cast<size_t>(i)] == static_cast<int>(s) && i != m.graph.output) {
        release(pool, values[static_cast<size_t>(i)].data);
      }
    }
  }
  const Tensor& result = values[static_cast<size_t>(m.graph.output)];
  if (result.channels_last) {
    channels_first(result.data.data(), batch, result.shape[2] * result.shape[3], result.shape[1], output);
  } else {
    std::copy(result.data.begin(), result.data.end(), output);
  }
  release(pool, x.data);
  for (Tensor& value : values) if (!value.data.empty()) release(pool, value.data);
  const std::lock_guard<std::mutex> hold(m.pool_lock);
  for (Floats& buffer : pool) m.pool.push_back(std::move(buffer));
}

template <typename Fn>
int guarded(Fn fn) {
  try {
    fn();
    return LOWBIT_OK;
  } catch (const Error& e) {
    last_error = e.what();
    return e.code;
  } catch (const std::bad_alloc&) {
    last_error = "out of memory";
    return LOWBIT_ERROR_MEMORY;
  } catch (const std::exception& e) {
    last_error = std::string("internal error: ") + e.what();
    return LOWBIT_ERROR_FORMAT;
  }
}

// A bad argument of a C API call (one call per check, not an inline throw sequence).
[[noreturn, gnu::cold]] void fail_argument(const std::string& what) { throw Error(LOWBIT_ERROR_ARGUMENT, what); }

// Plans every kernel layer (bit planes or integer words: the bulk of start-up) on up to kLoadThreads hardware
// threads, a layer at a time from a shared counter; the first failure by node order is rethrown. A pruned
// weight runs on the float code (its zeros are exact there; the kernels' planes have no keep map).
void plan_kernel_layers(lowbit_model& m) {
  constexpr unsigned kLoadThreads = 8;
  const size_t count = m.graph.nodes.size();
  m.binary.resize(count);
  m.int8.resize(count);
  std::vector<std::exception_ptr> failures(count);
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t k = next++; k < count; k = next++) {
      try {
        if (m.graph.nodes[k].weight.sparse) continue;
        m.binary[k] = plan_binary(m.graph, static_cast<int>(k));
        if (!m.binary[k]) m.int8[k] = plan_int8(m.graph, static_cast<int>(k));
      } catch (...) {
        failures[k] = std::current_exception();
      }
    }
  };
  std::vector<std::thread> helpers;
  const unsigned threads = std::min(kLoadThreads, std::max(1u, std::thread::hardware_concurrency()));
  for (unsigned t = 1; t < threads && t < count; ++t) helpers.emplace_back(work);
  work();
  for (std::thread& helper : helpers) helper.join();
  for (const std::exception_ptr& failure : failures) {
    if (failure) std::rethrow_exception(failure);
  }
}

lowbit_model* load(const uint8_t* data, size_t size) {
  auto m = std::make_unique<lowbit_model>();
  m->graph = load_graph(data, size);
  plan_kernel_layers(*m);
  if (lowbit_set_kernel_path(m.get(), "auto") != LOWBIT_OK) throw Error(LOWBIT_ERROR_FORMAT, last_error);
  return m.release();
}

// A whole open file: one read of a regular file's size (+ 1: the short read that says the end was reached),
// a doubling loop for anything else (a pipe; a directory fails its first read).
std::vector<uint8_t> read_all(std::FILE* file) {
  size_t want = size_t{1} << 16;
  struct stat info;
  if (fstat(fileno(file), &info) == 0 && S_ISREG(info.st_mode) && info.st_size > 0) {
    want = static_cast<size_t>(info.st_size) + 1;
  }
  std::vector<uint8_t> bytes;
  for (size_t used = 0;; want = bytes.size()) {
    bytes.resize(used + want);
    const size_t got = std::fread(bytes.data() + used, 1, want, file);
    used += got;
    if (got < want) {
      bytes.resize(used);
      return bytes;
    }
  }
}

int shape_of(const lowbit_model* model, bool input, int64_t* dims, int max_dims, int* rank) {
  return guarded([&] {
    if (!model || !rank || (max_dims > 0 && !dims)) fail_argument("null model, dims or rank");
    const Shape& shape = input ? model->graph.input_shape : model->graph.output_shape;
    *rank = static_cast<int>(shape.size());
    for (int k = 0; k < max_dims && k < *rank; ++k) dims[k] = shape[static_cast<size_t>(k)];
  });
}

}  // namespace
}  // namespace lowbit

using lowbit::guarded;

extern "C" {

int lowbit_load_memory(const void* data, size_t size, lowbit_model** model) {
  return guarded([&] {
    if (!model || (!data && size)) lowbit::fail_argument("null data or model pointer");
    *model = nullptr;
    *model = lowbit::load(static_cast<const uint8_t*>(data), size);
  });
}

int lowbit_load_file(const char* path, lowbit_model** model) {
  return guarded([&] {
    if (!path || !model) lowbit::fail_argument("null path or model pointer");
    *model = nullptr;
    std::FILE* file = std::fopen(path, "rb");
    if (!file) throw lowbit::Error(LOWBIT_ERROR_IO, std::string("cannot open ") + path);
    const std::vector<uint8_t> bytes = lowbit::read_all(file);
    const bool failed = std::ferror(file) != 0;
    std::fclose(file);
    if (failed) throw lowbit::Error(LOWBIT_ERROR_IO, std::string("cannot read ") + path);
    try {
      *model = lowbit::load(bytes.data(), bytes.size());
    } catch (const lowbit::Error& e) {
      throw lowbit::Error(e.code, std::string(path) + ": " + e.what());
    }
  });
}

void lowbit_free(lowbit_model* model) { delete model; }

int lowbit_input_shape(const lowbit_model* model, int64_t* dims, int max_dims, int* rank) {
  return lowbit::shape_of(model, true, dims, max_dims, rank);
}

int lowbit_output_shape(const lowbit_model* model, int64_t* dims, int max_dims, int* rank) {
  return lowbit::shape_of(model, false, dims, max_dims, rank);
}

int64_t lowbit_supported_paths(void) { return lowbit::supported_paths_mask(); }

int lowbit_set_kernel_path(lowbit_model* model, const char* path) {
  return guarded([&] {
    if (!model || !path) lowbit::fail_argument("null model or path");
    const std::string name = path;
    if (name == "float") {
      lowbit::plan(*model, lowbit::kFloatPath);
      model->path_name = name;
      return;
    }
    for (const lowbit::PathName& p : lowbit::kPaths) {
      if ((name == "auto" || name == p.name) && lowbit::path_supported(p.id)) {
        lowbit::plan(*model, p.id);
        model->path_name = p.name;
        return;
      }
      if (name == p.name) lowbit::fail_argument("kernel path '" + name + "' is not available on this CPU");
    }
    lowbit::fail_argument("unknown kernel path '" + name + "'; choose auto, avx512, avx2, neon, scalar or float");
  });
}

const char* lowbit_kernel_path(const lowbit_model* model) { return model ? model->path_name.c_str() : ""; }

int lowbit_kernel_layers(const lowbit_model* model, int64_t* bit_planes, int64_t* integer) {
  return guarded([&] {
    if (!model || !bit_planes || !integer) lowbit::fail_argument("null model or count");
    *bit_planes = 0, *integer = 0;
    for (const lowbit::Step& step : model->steps) *bit_planes += step.binary != nullptr, *integer += step.int8 != nullptr;
  });
}

int lowbit_fused_layers(const lowbit_model* model, int64_t* fused) {
  return guarded([&] {
    if (!model || !fused) lowbit::fail_argument("null model or count");
    *fused = 0;
    for (const lowbit::Step& step : model->steps) {
      *fused += step.packs_for != nullptr &&
                lowbit::pick_sink_row(model->path, step.binary->planes, static_cast<int64_t>(step.binary->offset2.size())) != nullptr;
    }
  });
}

int lowbit_set_threads(lowbit_model* model, int threads) {
  return guarded([&] {
    if (!model || threads < 1 || threads > 1024) lowbit::fail_argument("threads must be 1..1024");
    model->threads = threads;
  });
}

int lowbit_run(lowbit_model* model, const float* input, int64_t batch, float* output) {
  return guarded([&] {
    if (!model || !input || !output) lowbit::fail_argument("null model, input or output");
    const int64_t largest = [&] {
      int64_t values = lowbit::numel(model->graph.input_shape);
      for (const lowbit::Node& node : model->graph.nodes) values = std::max(values, lowbit::numel(node.out_shape));
      return values;
    }();
    if (batch < 1 || batch > (int64_t{1} << 31) / largest) {
      lowbit::fail_argument("batch must be 1.." + std::to_string((int64_t{1} << 31) / largest) + " for this model");
    }
    lowbit::run(*model, input, batch, output);
  });
}

const char* lowbit_last_error(void) { return lowbit::last_error.c_str(); }

}  // extern "C"
