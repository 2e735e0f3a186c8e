// Design notes
// - The worker lives in this process: every call is a GIL acquire, a Python
//   method call and a conversion of the reply, a few microseconds. Calls are
//   short and synchronous; ExecuteAsync only moves them off the caller's
//   thread and never holds the GIL across an await (pythonnet #1454).
// - Nothing from Python may crash the host: the Python facade answers every
//   failure with an envelope, and anything pythonnet itself throws is caught
//   here and turned into one (`internal`). After the runtime is shut down,
//   calls answer `unavailable` without touching Python.
// - Typed status calls read only the fields ServiceProcessing uses, straight
//   from the reply dict: the hot polling path converts nothing else.
using System;
using System.Threading.Tasks;
using Python.Runtime;

namespace EmbeddedWorkerHost
{
    /// <summary>What every status poll answers: the status, when it ended, and why it failed.</summary>
    public abstract class StatusReading
    {
        public bool Success;
        public string Status;
        public string CompletedAt;
        public string Error;
        public string ErrorCode;
    }

    public sealed class SessionStatus : StatusReading
    {
        public int Progress;
        public int CurrentStep;
    }

    public sealed class BatchStatus : StatusReading
    {
        public int ProcessedItems;
        public int FailedItems;
        public int TotalItems;
    }

    public sealed class EmbeddedProcessingWorker : IPythonWorkerService, IDisposable
    {
        readonly PythonRuntime runtime;
        readonly PyObject worker;
        readonly PyObject sessionStatus, batchStatus;  // bound methods, looked up once for the polling path
        bool closed;  // set and read under the GIL, so no call can use a disposed bound method

        public EmbeddedProcessingWorker(PythonRuntime runtime, object config = null)
        {
            this.runtime = runtime;
            using (Py.GIL())
            using (var module = Py.Import("embedded_worker"))
            using (var type = module.GetAttr("ProcessingWorker"))
            using (var settings = PyConvert.ToPython(config))
            {
                worker = type.Invoke(settings);
                sessionStatus = worker.GetAttr("get_session_status");
                batchStatus = worker.GetAttr("get_batch_status");
            }
            runtime.OnShutdown(() => Close(TimeSpan.FromSeconds(30)));
        }

        // ---- the ServiceProcessing shape -------------------------------------------------------

        public Task<Reply> ExecuteAsync(PythonWorkerType workerType, string command, object request)
        {
            return Task.Run(() => Execute(Qualified(workerType, command), request));
        }

        public Task<string> ExecuteJsonAsync(PythonWorkerType workerType, string command, string requestJson)
        {
            return Task.Run(() => ExecuteJson(Qualified(workerType, command), requestJson));
        }

        static string Qualified(PythonWorkerType workerType, string command)
        {
            if (command != null && command.Contains(".")) return command;
            return PyConvert.SnakeCase(workerType.ToString()) + "." + command;
        }

        public Reply Execute(string command, object request)
        {
            return Call("execute", command, request);
        }

        public string ExecuteJson(string command, string requestJson)
        {
            if (runtime.IsShutDown) return "{\"success\": false, \"error\": \"the worker is closed\", \"error_code\": \"unavailable\"}";
            try
            {
                using (Py.GIL())
                using (var name = PyConvert.ToPython(command))
                using (var json = PyConvert.ToPython(requestJson))
                using (var reply = worker.InvokeMethod("execute", name, json))
                    return reply.As<string>();
            }
            catch (Exception error)
            {
                return Reply.Failure("internal", error.GetType().Name + ": " + error.Message).ToString();
            }
        }

        // ---- typed commands ----------------------------------------------------------------------

        public Reply GetWorkflows() { return Call("get_workflows", null); }
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
        public Reply GetStatus() { return Call("get_status", null); }

        public SessionStatus GetSessionStatus(string sessionId)
        {
            return Poll(sessionStatus, sessionId, new SessionStatus(), (reply, status) =>
            {
                status.Progress = (int)Read<long>(reply, "progress");
                status.CurrentStep = (int)Read<long>(reply, "current_step");
            });
        }

        public BatchStatus GetBatchStatus(string batchId)
        {
            return Poll(batchStatus, batchId, new BatchStatus(), (reply, status) =>
            {
                status.ProcessedItems = (int)Read<long>(reply, "processed_items");
                status.FailedItems = (int)Read<long>(reply, "failed_items");
                status.TotalItems = (int)Read<long>(reply, "total_items");
            });
        }

        /// <summary>One status poll through a cached bound method, reading only the fields asked for.</summary>
        T Poll<T>(PyObject method, string id, T status, Action<PyObject, T> readFields) where T : StatusReading
        {
            string code, message;
            if (!Guarded(() =>
            {
                if (closed)
                {
                    status.ErrorCode = "unavailable";
                    status.Error = "the worker is closed";
                    return;
                }
                using (var key = PyConvert.ToPython(id))
                using (var reply = method.Invoke(key))
                {
                    status.Success = Read<bool>(reply, "success");
                    if (!status.Success)
                    {
                        status.Error = Read<string>(reply, "error");
                        status.ErrorCode = Read<string>(reply, "error_code");
                        return;
                    }
                    status.Status = Read<string>(reply, "status");
                    status.CompletedAt = Read<string>(reply, "completed_at");
                    if (status.Status == "failed") status.Error = Read<string>(reply, "error");
                    readFields(reply, status);
                }
            }, out code, out message))
            {
                status.Success = false;
                status.ErrorCode = code;
                status.Error = message;
            }
            return status;
        }

        // Key objects made once for the process: a status poll then costs one dict lookup per field.
        static readonly System.Collections.Concurrent.ConcurrentDictionary<string, PyObject> Keys =
            new System.Collections.Concurrent.ConcurrentDictionary<string, PyObject>();

        static T Read<T>(PyObject dict, string key)
        {
            PyObject name;
            if (!Keys.TryGetValue(key, out name)) name = Keys.GetOrAdd(key, new PyString(key));
            using (var value = dict.GetItem(name))  // only keys the protocol guarantees in that reply
                return value.IsNone() ? default(T) : value.As<T>();
        }

        // ---- pixels without copies ------------------------------------------------------------------

        /// <summary>The output's pixels in place; dispose the view to release them.</summary>
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
                {
                    if (!Read<bool>(reply, "success"))
                    {
                        failure = PyConvert.ToReply(reply);
                        return;
                    }
                    input = InputBuffer.Open(Read<string>(reply, "input_id"), reply.GetItem("buffer"));
                }
            }, out code, out message)) failure = Reply.Failure(code, message);
            error = failure;
            return input;
        }

        /// <summary>The progress board, mapped once; reads need no GIL and no call.</summary>
        public ProgressBoard OpenBoard()
        {
            using (Py.GIL())
            using (var layout = worker.InvokeMethod("board_layout"))
                return ProgressBoard.Open(worker.InvokeMethod("progress_board"), PyConvert.ToReply(layout));
        }

        public Reply DrainLogs(int maxRecords)
        {
            return Call("drain_logs", maxRecords);
        }

        // ---- lifetime -------------------------------------------------------------------------------

        /// <summary>Stop intake, cancel, join the worker's threads. Before PythonEngine.Shutdown.</summary>
        public Reply Close(TimeSpan timeout)
        {
            if (closed || runtime.IsShutDown) return Reply.Failure("unavailable", "the worker is closed");
            var reply = Call("close", timeout.TotalSeconds);  // meanwhile Python answers callers `unavailable`
            using (Py.GIL())
            {
                if (closed) return reply;
                closed = true;
                sessionStatus.Dispose();
                batchStatus.Dispose();
            }
            return reply;
        }

        public void Dispose()
        {
            Close(TimeSpan.FromSeconds(30));
        }

        // ---- the boundary -----------------------------------------------------------------------------

        Reply Call(string method, object argument)
        {
            return Call(method, argument, null, false);
        }

        Reply Call(string method, object first, object second)
        {
            return Call(method, first, second, true);
        }

        Reply Call(string method, object first, object second, bool two)
        {
            Reply reply = null;
            string code, message;
            if (!Guarded(() =>
            {
                using (var a = PyConvert.ToPython(first))
                using (var b = two ? PyConvert.ToPython(second) : null)
                using (var result = two ? worker.InvokeMethod(method, a, b) : worker.InvokeMethod(method, a))
                    reply = PyConvert.ToReply(result);
            }, out code, out message)) return Reply.Failure(code, message);
            return reply;
        }

        /// <summary>Run `body` under the GIL; false (with an error code) instead of any exception.</summary>
        bool Guarded(Action body, out string code, out string message)
        {
            code = message = null;
            if (runtime.IsShutDown)
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
            catch (Exception error)
            {
                code = "internal";
                message = error.GetType().Name + ": " + error.Message;
                return false;
            }
        }
    }
}
