// Design notes
// - The worker lives in this process: a call is a GIL acquire, one Python
//   call and one pass over the reply, a few microseconds. Requests and
//   replies cross through the C API (RequestWriter, ReplyReader): per-type
//   accessors cached, the reply read in one pass into plain C# values, no
//   PyObject made or handed out. Where the C API path is unavailable the
//   pythonnet path (PyConvert) does the same, slower.
// - ExecuteAsync completes synchronously for calls that take microseconds
//   (a completed task: a thread hop costs more than the call) and moves only
//   blocking calls (`background: false`) to the thread pool. CallDispatch
//   selects the other strategies the benchmark compares.
// - Typed status polls are served from the progress board while the work
//   runs: no GIL, no call, however many threads poll. Python is asked only
//   for what the board does not hold (when it ended, why it failed, work the
//   board does not list), and a final answer is kept until its board row
//   changes (a restart).
// - Nothing from Python may crash the host: failures are envelopes with a
//   typed code (WorkerErrors.cs); exceptions pythonnet throws become
//   `internal` with their message. After close, calls answer `unavailable`.
// - Never hold the GIL across an await (pythonnet #1454): every call here is
//   synchronous and short.
#pragma warning disable 612  // PyObject.Handle: read only while the object is alive, as the C API path needs
using System;
using System.Collections.Concurrent;
using System.Collections.Generic;
using System.Threading;
using System.Threading.Tasks;
using Python.Runtime;

namespace EmbeddedWorker
{
    public sealed partial class EmbeddedProcessingWorker : IPythonWorkerService, IDisposable
    {
        struct Slot
        {
            public int Index;
            public long Hash;
            public long Kind;
        }

        struct FinalReading
        {
            public long Sequence;
            public StatusReading Reading;
        }

        const long SessionKind = 1, BatchKind = 2;

        readonly PythonRuntime runtime;
        readonly WorkerOptions options;
        readonly PyObject worker;
        readonly Dictionary<string, PyObject> methods = new Dictionary<string, PyObject>();  // guarded by the GIL
        readonly ConcurrentDictionary<string, Slot> slots = new ConcurrentDictionary<string, Slot>();
        readonly ConcurrentDictionary<string, FinalReading> finals = new ConcurrentDictionary<string, FinalReading>();
        readonly ProgressBoard board;
        PythonCallThread callThread;  // made on first use of CallDispatch.DedicatedThread
        IntPtr execute, sessionStatus, batchStatus;  // borrowed from `methods`, valid until closed
        volatile bool closed;  // set under the GIL, so no call can use a released method

        public EmbeddedProcessingWorker(PythonRuntime runtime, object config = null)
            : this(runtime, new WorkerOptions { Config = config })
        {
        }

        public EmbeddedProcessingWorker(PythonRuntime runtime, WorkerOptions options)
        {
            this.runtime = runtime;
            this.options = options ?? new WorkerOptions();
            using (Py.GIL())
            using (var module = Py.Import("embedded_worker"))
            using (var type = module.GetAttr("ProcessingWorker"))
            using (var settings = PyConvert.ToPython(this.options.Config))
            {
                worker = type.Invoke(settings);
                execute = Method("execute").Handle;
                sessionStatus = Method("get_session_status").Handle;
                batchStatus = Method("get_batch_status").Handle;
                using (var layout = worker.InvokeMethod("board_layout"))
                    board = ProgressBoard.Open(worker.InvokeMethod("progress_board"), PyConvert.ToReply(layout));
            }
            runtime.OnShutdown(() => Close(this.options.CloseTimeout));
        }

        public WorkerOptions Options { get { return options; } }
        internal PythonRuntime Runtime { get { return runtime; } }

        // ---- the ServiceProcessing shape -------------------------------------------------------

        public Task<Reply> ExecuteAsync(PythonWorkerType workerType, string command, object request,
                                        CancellationToken cancellationToken = default(CancellationToken))
        {
            var name = Qualified(workerType, command);
            return Dispatch(() => Execute(name, request), RequestShapes.Blocks(request), cancellationToken);
        }

        public Task<string> ExecuteJsonAsync(PythonWorkerType workerType, string command, string requestJson,
                                             CancellationToken cancellationToken = default(CancellationToken))
        {
            var name = Qualified(workerType, command);
            return Dispatch(() => ExecuteJson(name, requestJson), RequestShapes.Blocks(ReadJson(requestJson)),
                            cancellationToken);
        }

        /// <summary>The request as Python's json reads it, for the dispatcher; null where it is not JSON (the facade answers that).</summary>
        object ReadJson(string requestJson)
        {
            if (requestJson == null) return null;
            object request = null;
            string code, message;
            Guarded(() =>
            {
                using (var json = Py.Import("json"))
                using (var text = new PyString(requestJson))
                using (var parsed = json.InvokeMethod("loads", text))
                    request = PyConvert.FromPython(parsed);
            }, out code, out message);
            return request;
        }

        Task<T> Dispatch<T>(Func<T> call, bool blocks, CancellationToken token)
        {
            if (token.IsCancellationRequested) return Task.FromCanceled<T>(token);
            if (blocks || options.Dispatch == CallDispatch.ThreadPool) return Task.Run(call, token);
            if (options.Dispatch == CallDispatch.DedicatedThread)
            {
                if (callThread == null)
                    lock (methods) if (callThread == null && !closed) callThread = new PythonCallThread();
                if (callThread != null) return callThread.Run(call, token);
            }
            try
            {
                return Task.FromResult(call());  // microseconds: done before a hop would have started
            }
            catch (Exception error)
            {
                return Task.FromException<T>(error);
            }
        }

        // Command names go as the caller spells them: the facade reads any spelling (its `_snake`), so they are
        // not converted here too. Processing is the facade's default domain: its commands go bare and meet the
        // facade's table of direct calls (no name parsing there). Other domains are prefixed with the enum's
        // name, read once (Enum.ToString is reflection on Mono); the values run 0..n-1, as GetNames lists them.
        static readonly string[] DomainNames = Enum.GetNames(typeof(PythonWorkerType));

        static string Qualified(PythonWorkerType workerType, string command)
        {
            if (command == null || workerType == PythonWorkerType.Processing || command.Contains(".")) return command;
            int index = (int)workerType;
            return (index >= 0 && index < DomainNames.Length ? DomainNames[index] : workerType.ToString()) + "." + command;
        }

        public Reply Execute(string command, object request)
        {
            return Invoke(execute, new object[] { command, request });
        }

        public string ExecuteJson(string command, string requestJson)
        {
            string text = null;
            string code, message;
            if (!Guarded(() =>
            {
                using (var name = new PyString(command ?? ""))
                using (var json = PyConvert.ToPython(requestJson))
                using (var reply = worker.InvokeMethod("execute", name, json))
                    text = reply.As<string>();
            }, out code, out message)) return Reply.Failure(code, message).ToString();
            return text;
        }

        // ---- typed commands ----------------------------------------------------------------------

        public Reply GetWorkflows() { return Call("get_workflows"); }
        public Reply GetWorkflow(string workflowId) { return Call("get_workflow", new { workflow_id = workflowId }); }
        public Reply ExecuteWorkflow(object request) { return Call("execute_workflow", request); }
        public Reply ControlSession(string sessionId, string action)
        {
            return Call("control_session", new { session_id = sessionId, action = action });
        }
        public Reply DeleteSession(string sessionId, bool forceCleanup = true)
        {
            return Call("delete_session", new { session_id = sessionId, force_cleanup = forceCleanup });
        }
        public Reply ExecuteBatch(object request) { return Call("execute_batch", request); }
        public Reply ControlBatch(string batchId, string action)
        {
            return Call("control_batch", new { batch_id = batchId, action = action });
        }
        public Reply GetBatch(string batchId, bool includeItems = false)
        {
            return Call("get_batch_status", new { batch_id = batchId, include_items = includeItems });
        }
        public Reply DeleteBatch(string batchId, bool forceCleanup = true)
        {
            return Call("delete_batch", new { batch_id = batchId, force_cleanup = forceCleanup });
        }
        public Reply GetStatus() { return Call("get_status"); }

        /// <summary>Status, progress and step: from the board while it runs, from Python for the rest.</summary>
        public SessionStatus GetSessionStatus(string sessionId)
        {
            return ReadStatus(sessionId, SessionKind, sessionStatus, () => new SessionStatus(), (status, row) =>
            {
                status.Progress = (int)(row.ProgressBp / 100);
                status.CurrentStep = (int)row.CurrentStep;
            }, (status, reply) =>
            {
                status.Progress = (int)reply.Number("progress");
                status.CurrentStep = (int)reply.Number("current_step");
            });
        }

        /// <summary>Status and item counts: from the board while it runs, from Python for the rest.</summary>
        public BatchStatus GetBatchStatus(string batchId)
        {
            return ReadStatus(batchId, BatchKind, batchStatus, () => new BatchStatus(), (status, row) =>
            {
                status.ProcessedItems = (int)row.ItemsDone;
                status.FailedItems = (int)row.ItemsFailed;
                status.TotalItems = (int)row.ItemsTotal;
            }, (status, reply) =>
            {
                status.ProcessedItems = (int)reply.Number("processed_items");
                status.FailedItems = (int)reply.Number("failed_items");
                status.TotalItems = (int)reply.Number("total_items");
            });
        }

        T ReadStatus<T>(string id, long kind, IntPtr method, Func<T> make, Action<T, BoardRow> fromBoard,
                        Action<T, Reply> fromReply) where T : StatusReading
        {
            BoardRow row = default(BoardRow);
            bool onBoard = options.StatusFromBoard && id != null && TryReadBoard(id, kind, out row);
            if (onBoard)
            {
                if (!IsFinal(row.Status))
                {
                    var live = make();
                    live.Success = true;
                    live.Status = row.Status;
                    live.FromBoard = true;
                    fromBoard(live, row);
                    return live;
                }
                FinalReading kept;
                if (finals.TryGetValue(id, out kept) && kept.Sequence == row.Sequence)
                {
                    var copy = (T)Clone(kept.Reading);
                    copy.FromBoard = true;
                    return copy;
                }
            }
            var status = make();
            if (closed)
            {
                status.ErrorCode = "unavailable";
                status.Error = "the worker is closed";
                return status;
            }
            var reply = Invoke(method, new object[] { id });
            status.Success = reply.Success;
            status.Error = reply.Error;
            status.ErrorCode = reply.ErrorCode;
            if (!status.Success) return status;
            status.Status = reply.Text("status");
            status.CompletedAt = reply.Text("completed_at");
            fromReply(status, reply);
            if (onBoard && IsFinal(status.Status))
                finals[id] = new FinalReading { Sequence = row.Sequence, Reading = Clone(status) };
            return status;
        }

        static StatusReading Clone(StatusReading reading)
        {
            var session = reading as SessionStatus;
            return session != null ? (StatusReading)session.Copy() : ((BatchStatus)reading).Copy();
        }

        static bool IsFinal(string status)
        {
            return status == "completed" || status == "failed" || status == "cancelled";
        }

        /// <summary>The board row of `id`, when the board lists it (its slot learned from a reply).</summary>
        bool TryReadBoard(string id, long kind, out BoardRow row)
        {
            Slot slot;
            row = default(BoardRow);
            if (!slots.TryGetValue(id, out slot) || slot.Kind != kind) return false;
            if (board.TryRead(slot.Index, out row) && row.IdHash == slot.Hash && row.Kind == kind) return true;
            slots.TryRemove(id, out slot);  // deleted, or the slot went to other work
            FinalReading gone;
            finals.TryRemove(id, out gone);
            return false;
        }

        /// <summary>Remember where the board lists the work a reply names.</summary>
        void Learn(Reply reply)
        {
            var slot = reply["board_slot"];
            if (!(slot is long) || (long)slot < 0) return;
            var session = reply["session_id"] as string;
            var batch = reply["batch_id"] as string;
            var id = batch ?? session;
            if (id == null || slots.ContainsKey(id)) return;
            slots[id] = new Slot { Index = (int)(long)slot, Hash = ProgressBoard.IdHash(id),
                                   Kind = batch != null ? BatchKind : SessionKind };
        }

        /// <summary>The board row of a session or batch this worker has seen a reply for.</summary>
        public bool TryGetProgress(string id, out WorkProgress progress)
        {
            BoardRow row;
            progress = default(WorkProgress);
            if (id == null || !(TryReadBoard(id, SessionKind, out row) || TryReadBoard(id, BatchKind, out row))) return false;
            progress = WorkProgress.From(id, row);
            return true;
        }

        // ---- pixels without copies ------------------------------------------------------------------

        /// <summary>The output's pixels in place; dispose the view to release them (PythonRuntime does at shutdown).</summary>
        public OutputView GetOutput(string outputId, out Reply error)
        {
            OutputView view = null;
            Reply failure = null;
            string code, message;
            if (!Guarded(() =>
            {
                using (var id = PyConvert.ToPython(outputId))
                {
                    var result = worker.InvokeMethod("get_output", id);
                    if (PyDict.IsDictType(result))
                    {
                        using (result) failure = PyConvert.ToReply(result);
                        return;
                    }
                    view = OutputView.Open(result);
                }
            }, out code, out message)) failure = Reply.Failure(code, message);
            error = failure;
            if (view != null) runtime.Track(view);
            return view;
        }

        /// <summary>A host-writable input image; fill it, then name its InputId as `init_image`.</summary>
        public InputBuffer AllocateInput(int height, int width, out Reply error)
        {
            InputBuffer input = null;
            Reply failure = null;
            string code, message;
            if (!Guarded(() =>
            {
                using (var h = PyConvert.ToPython(height))
                using (var w = PyConvert.ToPython(width))
                using (var reply = worker.InvokeMethod("allocate_input", h, w))
                using (var success = reply.GetItem("success"))
                {
                    if (!success.IsTrue())
                    {
                        failure = PyConvert.ToReply(reply);
                        return;
                    }
                    using (var id = reply.GetItem("input_id"))
                        input = InputBuffer.Open(id.As<string>(), reply.GetItem("buffer"));
                }
            }, out code, out message)) failure = Reply.Failure(code, message);
            error = failure;
            if (input != null) runtime.Track(input);
            return input;
        }

        /// <summary>A reader of the progress board; reads need no GIL and no call.</summary>
        public ProgressBoard OpenBoard()
        {
            ProgressBoard opened;
            using (Py.GIL())
            using (var layout = worker.InvokeMethod("board_layout"))
                opened = ProgressBoard.Open(worker.InvokeMethod("progress_board"), PyConvert.ToReply(layout));
            runtime.Track(opened);
            return opened;
        }

        public Reply DrainLogs(int maxRecords)
        {
            return Call("drain_logs", maxRecords);
        }

        // ---- lifetime -------------------------------------------------------------------------------

        /// <summary>Stop intake, cancel or suspend, join the worker's threads. Before PythonEngine.Shutdown.</summary>
        public Reply Close(TimeSpan timeout)
        {
            if (closed || runtime.IsShutDown) return Reply.Failure("unavailable", "the worker is closed");
            var reply = Call("close", timeout.TotalSeconds);  // meanwhile Python answers callers `unavailable`
            using (Py.GIL())
            {
                if (closed) return reply;
                closed = true;
                execute = sessionStatus = batchStatus = IntPtr.Zero;
                foreach (var method in methods.Values) method.Dispose();
                methods.Clear();
            }
            board.Dispose();
            if (callThread != null) callThread.Dispose();
            using (Py.GIL()) worker.Dispose();
            return reply;
        }

        public void Dispose()
        {
            Close(options.CloseTimeout);
        }

        // ---- the boundary -----------------------------------------------------------------------------

        /// <summary>A bound method of the Python worker, looked up once. With the GIL held.</summary>
        PyObject Method(string name)
        {
            PyObject method;
            if (!methods.TryGetValue(name, out method)) methods[name] = method = worker.GetAttr(name);
            return method;
        }

        static readonly object[] NoArguments = new object[0];

        /// <summary>worker.method(): a command that takes nothing.</summary>
        Reply Call(string method)
        {
            return CallMethod(method, NoArguments);
        }

        /// <summary>worker.method(argument).</summary>
        Reply Call(string method, object argument)
        {
            return CallMethod(method, new[] { argument });
        }

        /// <summary>The bound method looked up (once, by name), then invoked.</summary>
        Reply CallMethod(string method, object[] arguments)
        {
            IntPtr handle = IntPtr.Zero;
            string code, message;
            if (!Guarded(() => { if (!closed) handle = Method(method).Handle; }, out code, out message))
                return Reply.Failure(code, message);
            return Invoke(handle, arguments);
        }

        /// <summary>method(*arguments) through the C API: one GIL hold, the reply read in one pass.</summary>
        Reply Invoke(IntPtr method, object[] arguments)
        {
            if (!PythonApi.Available) return SlowInvoke(method, arguments);
            if (!runtime.Enter()) return Reply.Failure("unavailable", "the Python runtime is shut down");
            Reply reply;
            try
            {
                int gil = ThreadStates.Ensure();  // the thread's state kept between calls
                try
                {
                    if (closed || method == IntPtr.Zero) return Reply.Failure("unavailable", "the worker is closed");
                    var tuple = PythonApi.NewTuple((IntPtr)arguments.Length);
                    for (int i = 0; i < arguments.Length; i++)
                    {
                        var item = RequestWriter.Write(arguments[i]);
                        if (item == IntPtr.Zero)
                        {
                            PythonApi.DecRef(tuple);
                            return Reply.Failure("invalid_request", "the request cannot be converted: " + PythonApi.TakeError());
                        }
                        PythonApi.TupleSet(tuple, (IntPtr)i, item);
                    }
                    var result = PythonApi.Call(method, tuple, IntPtr.Zero);
                    PythonApi.DecRef(tuple);
                    if (result == IntPtr.Zero) return Reply.Failure("internal", "Python raised: " + PythonApi.TakeError());
                    var value = ReplyReader.Read(result);
                    PythonApi.DecRef(result);
                    reply = value as Reply ?? Reply.Failure("internal", "the worker answered a " + (value == null ? "None" : value.GetType().Name) + ", not a dict");
                }
                finally
                {
                    PythonApi.GilRelease(gil);
                }
            }
            catch (Exception error)
            {
                return Reply.Failure("internal", error.GetType().Name + ": " + error.Message);
            }
            finally
            {
                runtime.Exit();
            }
            Learn(reply);
            return reply;
        }

        /// <summary>The same through pythonnet, where the C API path is unavailable.</summary>
        Reply SlowInvoke(IntPtr method, object[] arguments)
        {
            Reply reply = null;
            string code, message;
            if (!Guarded(() =>
            {
                if (closed || method == IntPtr.Zero)
                {
                    reply = Reply.Failure("unavailable", "the worker is closed");
                    return;
                }
                PyObject callable = null;
                foreach (var known in methods.Values) if (known.Handle == method) callable = known;
                var converted = new List<PyObject>();
                try
                {
                    foreach (var argument in arguments) converted.Add(PyConvert.ToPython(argument));
                    using (var result = callable.Invoke(converted.ToArray())) reply = PyConvert.ToReply(result);
                }
                finally
                {
                    foreach (var argument in converted) argument.Dispose();
                }
            }, out code, out message)) return Reply.Failure(code, message);
            Learn(reply);
            return reply;
        }

        /// <summary>Run `body` under the GIL; false (with an error code and the exception's message) instead of any exception.</summary>
        bool Guarded(Action body, out string code, out string message)
        {
            code = message = null;
            if (!runtime.Enter())
            {
                code = "unavailable";
                message = "the Python runtime is shut down";
                return false;
            }
            try
            {
                using (Py.GIL()) body();
                return true;
            }
            catch (PythonException error)
            {
                code = "internal";
                message = "PythonException: " + error.Message;
                using (Py.GIL())  // its type, value and traceback are PyObjects: not left to the finalizer
                {
                    if (error.Value != null) error.Value.Dispose();
                    if (error.Traceback != null) error.Traceback.Dispose();
                }
                return false;
            }
            catch (Exception error)
            {
                code = "internal";
                message = error.GetType().Name + ": " + error.Message;
                return false;
            }
            finally
            {
                runtime.Exit();
            }
        }
    }
}
